"""The rig as the tests use it: the instruments by their role, driven through the wiring the
rig config describes, with cells and sensors indexed from 0 (as in code) and the pack current
positive when charging.

Every setting returns once the instrument has confirmed it (``SYSTem:ERRor?``), with the
monotonic time of that confirmation: the moment a reaction time counts from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from hil.config import RigConfig
from hil.instruments.drivers import (
    CellEmulator,
    ElectronicLoad,
    PowerSupply,
    RelayBox,
    ThermistorEmulator,
)
from hil.instruments.scpi import Identity, ScpiInstrument
from hil.instruments.transport import open_transport
from hil.ntc import Ntc

Instrument = TypeVar("Instrument", bound=ScpiInstrument)

REPO = Path(__file__).resolve().parent.parent
VIRTUAL_RIG_START_TIMEOUT_S = 60.0


class Rig:
    """The instruments of one rig config, connected, identified and reset."""

    def __init__(self, config: RigConfig):
        self.config = config
        self.cells = self._open(CellEmulator, "cell_emulator")
        self.supply = self._open(PowerSupply, "power_supply") if config.power_supply else None
        self.load = self._open(ElectronicLoad, "electronic_load")
        self.relays = self._open(RelayBox, "relay_box")
        self.thermistors = self._open(ThermistorEmulator, "thermistor_emulator")
        found = {
            "cell_emulator": self.cells,
            "power_supply": self.supply,
            "electronic_load": self.load,
            "relay_box": self.relays,
            "thermistor_emulator": self.thermistors,
        }
        self.instruments: dict[str, ScpiInstrument] = {
            name: instrument for name, instrument in found.items() if instrument is not None
        }
        self.cell_channels = list(config.cell_emulator.channels)
        self.sensor_channels = list(config.thermistor_emulator.channels)
        self.ntc = Ntc(config.thermistor_emulator.r25_ohm, config.thermistor_emulator.beta_k)
        self.identities: dict[str, Identity] = {}

    def _open(self, kind: type[Instrument], name: str) -> Instrument:
        """The instrument of section ``name`` on its transport (opened at its first command)."""
        address = self.config.instruments[name].address
        return kind(name, open_transport(name, address, self.config.rig.io_timeout_s))

    @property
    def n_cells(self) -> int:
        return len(self.cell_channels)

    @property
    def n_sensors(self) -> int:
        return len(self.sensor_channels)

    def connect(self) -> None:
        """Identify every instrument (WrongInstrument if one is not the configured one) and
        reset it to its power-on settings."""
        for name, instrument in self.instruments.items():
            self.identities[name] = instrument.expect(self.config.instruments[name].identity)
            instrument.reset()
        self.load.constant_current()

    def set_up(self) -> None:
        """The rig's resting state: every cell at its nominal voltage, every sensor at its
        nominal temperature, every sense wire connected, no sensor shorted, no current."""
        c = self.config
        self.set_pack_current(0.0)
        if self.supply is not None:
            self.supply.set_voltage(c.power_supply.voltage_v)
        self.cells.set_current_limit(self.cell_channels, c.cell_emulator.current_limit_a)
        self.set_cells(c.cell_emulator.nominal_voltage_v)
        self.cells.output(self.cell_channels, True)
        self.set_temperatures(c.thermistor_emulator.nominal_temp_c)
        wiring = c.relay_box
        if wiring.sense_wire_channels:
            self.relays.close_channels(list(wiring.sense_wire_channels.values()))
        if wiring.sensor_short_channels:
            self.relays.open_channels(list(wiring.sensor_short_channels.values()))

    def safe(self) -> None:
        """No current through the pack: the load's input and the supply's output off."""
        self.load.input(False)
        if self.supply is not None:
            self.supply.output(False)

    def shut_down(self) -> None:
        """The end of a run: no current, and the cell emulator's outputs off."""
        self.safe()
        self.cells.output(self.cell_channels, False)

    def close(self) -> None:
        for instrument in self.instruments.values():
            instrument.close()

    # ---------------------------------------------------------------- cells
    def set_cells(self, voltage_v: float | Sequence[float]) -> float:
        """Every cell to one voltage, or cell ``i`` to ``voltage_v[i]``; the time it took."""
        if isinstance(voltage_v, int | float):
            self.cells.set_voltage(self.cell_channels, float(voltage_v))
            return time.monotonic()
        if len(voltage_v) != self.n_cells:
            raise ValueError(f"{len(voltage_v)} voltages for {self.n_cells} cells")
        by_value: dict[float, list[int]] = {}
        for channel, value in zip(self.cell_channels, voltage_v, strict=True):
            by_value.setdefault(float(value), []).append(channel)
        for value, channels in by_value.items():
            self.cells.set_voltage(channels, value)
        return time.monotonic()

    def set_cell(self, cell: int, voltage_v: float) -> float:
        self.cells.set_voltage([self.cell_channels[cell]], voltage_v)
        return time.monotonic()

    def cell_voltages(self) -> list[float]:
        """The emulator's measured output of every cell."""
        return self.cells.measure_voltages(self.cell_channels)

    # ---------------------------------------------------------------- temperatures
    def set_temperatures(self, temp_c: float | Sequence[float]) -> float:
        """Every sensor (or sensor ``j`` to ``temp_c[j]``) to the resistance the board's NTC
        has at that temperature."""
        temps = [float(temp_c)] * self.n_sensors if isinstance(temp_c, int | float) else temp_c
        if len(temps) != self.n_sensors:
            raise ValueError(f"{len(temps)} temperatures for {self.n_sensors} sensors")
        by_value: dict[float, list[int]] = {}
        for channel, value in zip(self.sensor_channels, temps, strict=True):
            by_value.setdefault(float(value), []).append(channel)
        for value, channels in by_value.items():
            self.thermistors.set_resistance(channels, self.ntc.resistance_ohm(value))
        return time.monotonic()

    def sensor_temps(self) -> list[float]:
        """What the thermistor emulator holds, as temperatures of the board's NTC."""
        return [self.ntc.temp_c(r) for r in self.thermistors.resistances(self.sensor_channels)]

    # ---------------------------------------------------------------- relays
    def _relay(self, table: dict[int, int], number: int, what: str) -> int:
        if number not in table:
            raise ValueError(f"the rig config wires no relay to {what} {number}")
        return table[number]

    def open_sense_wire(self, cell: int) -> float:
        channel = self._relay(self.config.relay_box.sense_wire_channels, cell + 1, "cell")
        self.relays.open_channels([channel])
        return time.monotonic()

    def connect_sense_wire(self, cell: int) -> float:
        channel = self._relay(self.config.relay_box.sense_wire_channels, cell + 1, "cell")
        self.relays.close_channels([channel])
        return time.monotonic()

    def short_sensor(self, sensor: int, shorted: bool) -> float:
        channel = self._relay(self.config.relay_box.sensor_short_channels, sensor + 1, "sensor")
        if shorted:
            self.relays.close_channels([channel])
        else:
            self.relays.open_channels([channel])
        return time.monotonic()

    # ---------------------------------------------------------------- pack current
    def set_pack_current(self, current_a: float) -> float:
        """Charge through the supply (``current_a`` > 0), discharge through the load (< 0),
        or neither (0). The other instrument is switched off first, so they never fight."""
        if current_a > 0.0:
            if self.supply is None:
                raise ValueError("the rig has no power supply to charge with")
            self.load.input(False)
            self.supply.set_current(current_a)
            self.supply.output(True)
        elif current_a < 0.0:
            if self.supply is not None:
                self.supply.output(False)
            self.load.set_current(-current_a)
            self.load.input(True)
        else:
            self.safe()
        return time.monotonic()

    def discharge_link(self, timeout_s: float) -> float:
        """Empty the DC link through the electronic load (its voltage below [electronic_load]
        link_discharged_v), as an inverter's discharge circuit would before a start: a BMS
        finds a charged link at its next precharge otherwise. Only with the contactors open.
        Returns the link voltage reached (the load's reading)."""
        section = self.config.electronic_load
        self.set_pack_current(-section.link_discharge_current_a)
        deadline_s = time.monotonic() + timeout_s
        try:
            while (link_v := self.load.measure_voltage()) > section.link_discharged_v:
                if time.monotonic() > deadline_s:
                    break
                time.sleep(0.05)
        finally:
            self.safe()
        return link_v

    def measured_pack_current(self) -> float:
        """What the supply sources minus what the load sinks (positive = charging)."""
        sourced = self.supply.measure_current() if self.supply is not None else 0.0
        return sourced - self.load.measure_current()


class VirtualRigProcess:
    """``python -m hil.virtual`` for one run: started, its instruments' addresses read from
    its ready line, stopped at the end (its standard input closing stops it too)."""

    def __init__(self, rig_config: Path, board_config: Path, env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 -- open for the process's whole life
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hil.virtual",
                "--rig-config",
                str(rig_config),
                "--board-config",
                str(board_config),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._ready: dict | None = None
        reader = threading.Thread(target=self._read_ready, name="virtual-rig-ready", daemon=True)
        reader.start()
        reader.join(VIRTUAL_RIG_START_TIMEOUT_S)
        if self._ready is None:
            self.stop()
            raise RuntimeError(
                f"the virtual rig did not start within {VIRTUAL_RIG_START_TIMEOUT_S:g} s "
                f"(exit code {self.proc.poll()}):\n{log.read_text()[-3000:]}"
            )
        self.addresses: dict[str, str] = self._ready["addresses"]

    def _read_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            ready = json.loads(line)
        except json.JSONDecodeError:
            return
        if isinstance(ready, dict) and ready.get("ready"):
            self._ready = ready

    def stop(self) -> int:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()
