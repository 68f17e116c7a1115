"""The simulated pack: cells, thermal model, sensors, contactor box and DC link.

This is the plant, not a replay of the estimator. Every cell has its own capacity, resistance
and initial SOC around the nominal parameter set, a second-order Thevenin response with the
set's impedance tables over SOC and temperature, and a lumped thermal mass cooled to ambient. The
sensors add per-channel offsets and noise. The contactor box has three relays, a precharge
resistor and a DC-link capacitor. Faults are injected as the hardware would show them. On a
HIL rig (``hil/virtual``) instruments take the place of the cells and the temperature sensors
(:class:`ExternalSources`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bms.estimation import ecm
from bms.estimation.cell_params import CellParams
from bms.estimation.ecm import SECONDS_PER_HOUR
from bms.types import ALL_OPEN, RelayStates
from drivers.sim.options import SimOptions

LINK_BLEED_OHM = 10000.0
"""Discharge resistor across the DC link, so the link voltage decays once disconnected."""


@dataclass(slots=True)
class Readings:
    """What the sensors report this step; NaN is "not available", flags mark invalid cells."""

    cell_voltage_v: np.ndarray
    cell_voltage_invalid: np.ndarray
    cell_temp_c: np.ndarray
    cell_temp_invalid: np.ndarray
    current_a: float
    pack_voltage_v: float
    link_voltage_v: float
    relays: RelayStates
    insulation_kohm: float
    interlock_closed: bool


@dataclass(slots=True)
class ExternalSources:
    """Instruments of a HIL rig that take the place of parts of the plant (``hil/virtual``);
    each left None is the model's."""

    cell_voltage_v: np.ndarray | None = None
    """(n_cells,) what a cell emulator's channels hold at the cells' sense wires: the cells'
    terminal voltages, whatever the current (an emulator regulates its output)."""
    sensor_temp_c: np.ndarray | None = None
    """(n_temp_sensors,) what the front-end makes of each temperature sensor (a thermistor
    emulator's resistance read through the front-end's curve); NaN: the sensor reads open or
    shorted, and the front-end flags it invalid."""
    link_load_a: float = 0.0
    """What an instrument on the DC link (a rig's electronic load) draws from it while the
    contactors leave it disconnected from the pack: the link's capacitance gives it until it
    is empty."""


@dataclass(slots=True)
class InjectedFaults:
    open_wire: set[int] = field(default_factory=set)
    stuck: dict[int, float] = field(default_factory=dict)
    nan: set[int] = field(default_factory=set)
    overtemp: set[int] = field(default_factory=set)
    short: bool = False
    weld: bool = False
    insulation: bool = False
    interlock: bool = False


class PackPlant:
    """Series pack of ``n_cells`` groups of ``n_parallel`` cells; call :meth:`step` then
    :meth:`readings`. A group is simulated as one cell of ``n_parallel`` times the capacity,
    capacitance and thermal mass and ``1 / n_parallel`` of the resistance (its cells share
    the current equally); each spread applies per group."""

    def __init__(
        self,
        cell: CellParams,
        n_cells: int,
        n_temp_sensors: int,
        options: SimOptions,
        n_parallel: int = 1,
    ):
        self.cell = cell
        self.options = options
        self.n_parallel = n_parallel
        self.rng = rng = np.random.default_rng(options.seed)
        scatter = lambda sigma: 1.0 + sigma * rng.standard_normal(n_cells)  # noqa: E731
        self.capacity_ah = cell.capacity_ah * n_parallel * scatter(options.capacity_spread)
        self.resistance_factor = scatter(options.resistance_spread)
        self._impedance = np.empty((n_cells, 5))
        self.soc = np.clip(
            options.initial_soc + options.initial_soc_spread * rng.standard_normal(n_cells), 0, 1
        )
        self.v_rc1_v = np.zeros(n_cells)
        self.v_rc2_v = np.zeros(n_cells)
        self.temp_c = np.full(n_cells, options.ambient_temp_c)
        self.voltage_offset_v = options.voltage_offset_v * rng.standard_normal(n_cells)
        self.current_offset_a = options.current_offset_a * float(rng.standard_normal())
        # Temperature sensor j sits on cell sensor_cell[j].
        self.sensor_cell = (np.arange(n_temp_sensors) * n_cells) // n_temp_sensors
        self.relays = ALL_OPEN
        self.link_voltage_v = 0.0
        self.current_a = 0.0
        self.faults = InjectedFaults()
        self.external = ExternalSources()
        self.bleeding = np.zeros(n_cells, dtype=bool)

    # ---------------------------------------------------------------- physics
    def impedance(self) -> tuple[np.ndarray, ...]:
        """Each group's (r0_ohm, r1_ohm, c1_f, r2_ohm, c2_f), (n_cells,) each, at its present
        SOC and temperature."""
        ecm.impedances(self.cell.tables, self.soc, self.temp_c, self._impedance)
        r0, r1, c1, r2, c2 = self._impedance.T
        k = self.resistance_factor / self.n_parallel
        n = self.n_parallel
        return r0 * k, r1 * k, c1 * n, r2 * k, c2 * n

    def ocv_v(self) -> np.ndarray:
        return self.cell.ocv_at(self.soc, self.temp_c)

    def emf_v(self) -> np.ndarray:
        """Each cell's source voltage (n_cells,) behind its series resistance: OCV and the RC
        pairs' voltages, or the emulator's channel voltage where one holds the cells."""
        emulated = self.external.cell_voltage_v
        if emulated is not None:
            return np.asarray(emulated, dtype=float)
        return self.ocv_v() + self.v_rc1_v + self.v_rc2_v

    def terminal_voltage_v(self, current_a: float) -> np.ndarray:
        """Cell terminal voltages (n_cells,) carrying ``current_a`` (positive = charging)."""
        if self.external.cell_voltage_v is not None:
            return self.emf_v()  # regulated at the sense wires
        r0 = self.impedance()[0]
        return self.emf_v() + r0 * current_a

    def step(self, dt_s: float, load_current_a: float, command: RelayStates) -> None:
        """Advance ``dt_s`` seconds with the relays commanded and the load drawing its current.

        The load only sees the pack through closed main contactors; a short on the DC link
        draws what the pack's internal resistance and the short's resistance allow.
        """
        self._move_relays(command)
        o = self.options
        emf_pack_v = float(self.emf_v().sum())
        r_pack_ohm = float(self.impedance()[0].sum())
        main = self.relays.negative and self.relays.positive
        pre = self.relays.negative and self.relays.precharge and not self.relays.positive
        shorted = self.faults.short and (main or pre)
        if shorted:
            # The short holds the link near zero: the pack drives it through whatever is in
            # series (the precharge resistor too, while precharging).
            series_ohm = r_pack_ohm + o.short_resistance_ohm
            series_ohm += 0.0 if main else o.precharge_resistance_ohm
            short_a = emf_pack_v / series_ohm
            current = (load_current_a if main else 0.0) - short_a
        elif main:
            current = load_current_a
        elif pre:
            current = -(emf_pack_v - self.link_voltage_v) / (
                o.precharge_resistance_ohm + r_pack_ohm
            )
        else:
            current = 0.0
        self.current_a = current

        self._step_cells(dt_s, current)
        pack_v = float(self.terminal_voltage_v(current).sum())
        if shorted:
            self.link_voltage_v = short_a * o.short_resistance_ohm
        elif main:
            self.link_voltage_v = pack_v
        elif pre:
            tau = o.precharge_resistance_ohm * o.link_capacitance_f
            self.link_voltage_v += (pack_v - self.link_voltage_v) * (1 - math.exp(-dt_s / tau))
        else:
            self.link_voltage_v *= math.exp(-dt_s / (LINK_BLEED_OHM * o.link_capacitance_f))
            drawn_v = self.external.link_load_a * dt_s / o.link_capacitance_f
            self.link_voltage_v = max(0.0, self.link_voltage_v - drawn_v)

    def _move_relays(self, command: RelayStates) -> None:
        positive = command.positive or (self.faults.weld and self.relays.positive)
        self.relays = RelayStates(command.negative, command.precharge, positive)

    def _step_cells(self, dt_s: float, pack_current_a: float) -> None:
        r0, r1, c1, r2, c2 = self.impedance()
        # A bleeding cell also discharges through its balancing resistor.
        bleed_a = np.where(self.bleeding, self.ocv_v() / self.options.bleed_resistance_ohm, 0.0)
        current_a = pack_current_a - bleed_a
        self.soc = np.clip(
            self.soc + current_a * dt_s / (SECONDS_PER_HOUR * self.capacity_ah), 0.0, 1.0
        )
        # Exact discretisation of each RC pair for a current held over the step.
        for v, r, c in ((self.v_rc1_v, r1, c1), (self.v_rc2_v, r2, c2)):
            decay = np.exp(-dt_s / (r * c))
            v *= decay
            v += r * current_a * (1.0 - decay)
        o = self.options
        heat_w = current_a**2 * r0 + self.v_rc1_v**2 / r1 + self.v_rc2_v**2 / r2
        for cell in self.faults.overtemp:
            heat_w[cell] += o.overtemp_heat_w
        n = self.n_parallel
        cooling_w = n * o.cooling_w_per_k * (o.ambient_temp_c - self.temp_c)
        self.temp_c = self.temp_c + dt_s * (heat_w + cooling_w) / (n * o.heat_capacity_j_per_k)

    # ---------------------------------------------------------------- sensors
    def readings(self) -> Readings:
        """Sample every sensor once, with offsets, noise and injected sensor faults."""
        o = self.options
        n = self.soc.size
        noise = self.rng.standard_normal
        true_cell_v = self.terminal_voltage_v(self.current_a)
        cell_v = true_cell_v + self.voltage_offset_v + o.voltage_noise_v * noise(n)
        invalid = np.zeros(n, dtype=bool)
        for cell in self.faults.open_wire:
            cell_v[cell] = 0.0
            invalid[cell] = True
        for cell, frozen_v in self.faults.stuck.items():
            cell_v[cell] = frozen_v
        for cell in self.faults.nan:
            cell_v[cell] = math.nan
        temp_noise_c = o.temp_noise_c * noise(self.sensor_cell.size)
        sensed = self.external.sensor_temp_c
        if sensed is None:
            temps = self.temp_c[self.sensor_cell] + temp_noise_c
            temp_invalid = np.zeros(temps.size, dtype=bool)
        else:
            temp_invalid = np.isnan(sensed)
            temps = np.where(temp_invalid, 0.0, sensed + temp_noise_c)
        pack_v = float(true_cell_v.sum())
        return Readings(
            cell_voltage_v=cell_v,
            cell_voltage_invalid=invalid,
            cell_temp_c=temps,
            cell_temp_invalid=temp_invalid,
            current_a=self.current_a + self.current_offset_a + o.current_noise_a * noise(),
            pack_voltage_v=pack_v + 0.01 * noise(),
            link_voltage_v=max(0.0, self.link_voltage_v + 0.01 * noise()),
            relays=self.relays,
            insulation_kohm=(
                o.insulation_fault_kohm if self.faults.insulation else o.insulation_kohm
            ),
            interlock_closed=not self.faults.interlock,
        )
