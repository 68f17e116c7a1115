"""The virtual rig: emulated instruments wired to the simulated pack as the rig config wires
real ones to a board.

The simulated pack (drivers/sim: its contactor box with the dead-man, the DC link, the
insulation monitor and the cell-monitoring front-end on CAN) runs as in ``bms plant``, with the
instruments in the place of its cells and sensors: at the start of every tick the cell
emulator's channel voltages become the cells' terminal voltages, the thermistor emulator's
resistances (through the board's NTC curve, with the relay box's shorts) become the sensors'
temperatures, the relay box's open sense-wire relays become open wires, and the supply and the
load make the pack current. Then the instruments' measurements are filled in from the plant.
"""

from __future__ import annotations

import math

import numpy as np

from bms.config import BmsConfig
from drivers.sim.node import SimulatedPack
from hil.config import RigConfig, check_against_board
from hil.ntc import Ntc
from hil.virtual.instruments import (
    VirtualCellEmulator,
    VirtualElectronicLoad,
    VirtualPowerSupply,
    VirtualRelayBox,
    VirtualThermistorEmulator,
)
from hil.virtual.scpi import ScpiDevice

SUPPLY_MAX_VOLTAGE_V = 80.0
LOAD_DROPOUT_V = 0.5
"""Below this the virtual load cannot hold its current (as a real one's minimum voltage)."""
RELAY_COUNT = 32
BOARD_TEMP_RANGE_C = (-40.0, 125.0)
"""The virtual board's NTC input reads this range; a resistance outside it is an open or
shorted sensor, flagged invalid (as a front-end with open/short detection does)."""


class VirtualRig:
    """The instruments of ``rig`` and the simulated pack of ``board``'s ``[sim]``."""

    def __init__(self, rig: RigConfig, board: BmsConfig):
        if board.sim is None:
            raise ValueError(f"{board.source}: the virtual rig needs the board's [sim] section")
        problems = check_against_board(rig, board)
        if problems:
            raise ValueError("; ".join(problems))
        self.cells = VirtualCellEmulator(max(rig.cell_emulator.channels))
        self.supply = (
            VirtualPowerSupply(SUPPLY_MAX_VOLTAGE_V, rig.power_supply.max_current_a)
            if rig.power_supply is not None
            else None
        )
        self.load = VirtualElectronicLoad(rig.electronic_load.max_current_a)
        wiring = rig.relay_box
        used = [*wiring.sense_wire_channels.values(), *wiring.sensor_short_channels.values()]
        self.relays = VirtualRelayBox(max([RELAY_COUNT, *used]))
        self.thermistors = VirtualThermistorEmulator(max(rig.thermistor_emulator.channels))
        self.ntc = Ntc(rig.thermistor_emulator.r25_ohm, rig.thermistor_emulator.beta_k)
        low_c, high_c = BOARD_TEMP_RANGE_C
        self.readable_ohm = (self.ntc.resistance_ohm(high_c), self.ntc.resistance_ohm(low_c))
        self.cell_channel = np.array(rig.cell_emulator.channels) - 1
        self.sensor_channel = np.array(rig.thermistor_emulator.channels) - 1
        self.sense_relay = {cell - 1: ch - 1 for cell, ch in wiring.sense_wire_channels.items()}
        self.short_relay = {s - 1: ch - 1 for s, ch in wiring.sensor_short_channels.items()}
        options = board.sim.options.model_copy(
            update={"deadman_timeout_s": rig.contactor_box.deadman_hold_s}
        )
        self.pack = SimulatedPack(board, options, [])
        self.pack.before_tick = self._connect
        self._pack_current_a = 0.0
        self.pack.load = lambda t_s: self._pack_current_a

    @property
    def devices(self) -> dict[str, ScpiDevice]:
        """Each instrument by its rig-config section."""
        found = {
            "cell_emulator": self.cells,
            "power_supply": self.supply,
            "electronic_load": self.load,
            "relay_box": self.relays,
            "thermistor_emulator": self.thermistors,
        }
        return {name: device for name, device in found.items() if device is not None}

    def _connect(self, t_s: float) -> None:
        """At the start of a tick (the pack's thread): instruments into the plant, the plant's
        last step into the instruments' measurements."""
        plant = self.pack.plant
        relays = plant.relays
        main = relays.negative and relays.positive
        with self.cells.lock:
            self.cells.channel_current_a[:] = 0.0
            self.cells.channel_current_a[self.cell_channel] = -plant.current_a  # sourcing
            plant.external.cell_voltage_v = self.cells.output_v()[self.cell_channel]
        with self.relays.lock:
            closed = self.relays.closed.copy()
        plant.faults.open_wire = {cell for cell, ch in self.sense_relay.items() if not closed[ch]}
        with self.thermistors.lock:
            resistance_ohm = self.thermistors.resistance_ohm[self.sensor_channel].copy()
        for sensor, ch in self.short_relay.items():
            if closed[ch]:
                resistance_ohm[sensor] = 0.0
        plant.external.sensor_temp_c = np.array([self._board_reads(r) for r in resistance_ohm])

        pack_v = float(plant.emf_v().sum())
        sourced_a = 0.0
        if self.supply is not None:
            with self.supply.lock:
                sourced_a = self.supply.sourced_a(pack_v)
                self.supply.measured_voltage_v = plant.link_voltage_v
                self.supply.measured_current_a = sourced_a if main else 0.0
        precharging = relays.negative and relays.precharge and not relays.positive
        with self.load.lock:
            sunk_a = self.load.sunk_a()
            self.load.measured_voltage_v = plant.link_voltage_v
            # with the link cut off from the pack the load empties its capacitance, and a load
            # in constant current drops out once there is (next to) no voltage left
            link_only = not (main or precharging)
            drawing = main or (link_only and plant.link_voltage_v > LOAD_DROPOUT_V)
            self.load.measured_current_a = sunk_a if drawing else 0.0
        plant.external.link_load_a = sunk_a if link_only else 0.0
        self._pack_current_a = sourced_a - sunk_a

    def _board_reads(self, resistance_ohm: float) -> float:
        low_ohm, high_ohm = self.readable_ohm
        if not low_ohm <= resistance_ohm <= high_ohm:
            return math.nan
        return self.ntc.temp_c(resistance_ohm)
