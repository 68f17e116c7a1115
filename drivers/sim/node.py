"""The simulated pack as nodes on the CAN bus: a cell-monitoring unit (CMU) that sends
measurements and a contactor box (PDU) that obeys relay commands and reports feedback.

It runs in its own thread at its own rate, with its own bus handle, so the BMS reads it through
exactly the code it uses for real hardware. The contactor box opens every relay when the
BMS's command frames stop for ``deadman_timeout_s`` (the hardware dead-man).

The CMU sends what the front-end's default mapping expects, laid out as the DBC says: cell
``i`` in signal ``Cell{i+1}_Voltage`` of the multiplexer group that carries it, the same for the
temperatures, every frame with its rolling counter (advancing once per tick, so once per frame
of each group) and the checksum the DBC defines.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import numpy as np

from bms.backends import Simulator
from bms.comms.dbc import DbcCodec
from bms.config import BmsConfig
from bms.estimation.cell_params import load_cell_params
from bms.loop import RateKeeper
from bms.types import ALL_OPEN
from drivers.can.contactors import RELAY_SIGNALS, relay_signals, relays_from_signals
from drivers.can.link import FrameEncoder, RollingCounter, open_bus, send_message
from drivers.sim import load
from drivers.sim.faults import FAULT_KINDS, Injection, make_injection, parse_injection
from drivers.sim.options import LoadOptions, SimOptions
from drivers.sim.plant import PackPlant

log = logging.getLogger(__name__)


def _load_profile(options: LoadOptions):
    if options.profile == "constant":
        return load.constant(options.current_a)
    if options.profile == "pulse":
        return load.pulse(options.current_a, options.pulse_period_s, options.pulse_duty)
    return load.drive_cycle(options.drive_cycle_file, options.drive_cycle_scale)


class SimulatedPack(Simulator):
    """The plant, its load and its fault schedule, on a thread of its own."""

    Options = SimOptions
    FAULT_KINDS = FAULT_KINDS

    def __init__(self, config: BmsConfig, options: SimOptions, injections: list[str]):
        if config.can is None:
            raise ValueError(f"{config.source}: the simulated pack needs a [can] section")
        if options.deadman_timeout_s < 2 * config.loop.period_s:
            raise ValueError(
                f"{config.source}: [sim] deadman_timeout_s ({options.deadman_timeout_s:g} s) "
                f"must be at least two loop periods ({2 * config.loop.period_s:g} s)"
            )
        n_cells = config.pack.n_cells
        self.schedule: list[Injection] = sorted(
            [make_injection(f.kind, f.at_s, f.cell, n_cells) for f in options.faults]
            + [parse_injection(text, n_cells) for text in injections],
            key=lambda injection: injection.at_s,
        )
        self.options = options
        self.load = _load_profile(options.load)
        self.plant = PackPlant(
            load_cell_params(config.pack.cell_params),
            n_cells,
            config.pack.n_temp_sensors,
            options,
        )
        codec = DbcCodec(config.can.dbc_file)
        self.codec = codec
        self.encoder = FrameEncoder(codec)
        self.voltages = codec.message("CMU_CellVoltages")
        self.temperatures = codec.message("CMU_CellTemperatures")
        self.voltage_frames = _frames(
            self.voltages, "Cell{n}_Voltage", "Cell{n}_VoltageInvalid", n_cells
        )
        self.temperature_frames = _frames(
            self.temperatures, "Temp{n}", "Temp{n}_Invalid", config.pack.n_temp_sensors
        )
        self.pack = codec.message(
            "CMU_PackMeasurements", ["PackCurrent", "PackVoltage", "LinkVoltage", "Counter"]
        )
        self.command_message = codec.message("BMS_ContactorCommand", RELAY_SIGNALS)
        self.feedback_message = codec.message(
            "PDU_ContactorFeedback", [*RELAY_SIGNALS, "InterlockClosed"]
        )
        self.balancing_message = codec.message("BMS_BalancingCommand")
        self.balancing_counter = RollingCounter()
        self._balancing_t_s = -math.inf
        self.imd_message = codec.message(
            "IMD_Info", ["InsulationResistance", "MeasurementValid", "Counter"]
        )
        self.can_config = config.can
        self.silenced = False
        self._command = ALL_OPEN
        self._command_t_s = -math.inf
        self.command_counter = RollingCounter()
        self._counter = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bus = None
        self.before_tick: Callable[[float], None] | None = None
        """Called with the plant time at the start of every tick, on the pack's thread: where
        a HIL rig's instruments set the plant's sources and faults (hil/virtual)."""

    def attach(self) -> None:
        """Join the bus; :meth:`tick` can then be driven by hand (tests) or by :meth:`start`."""
        self._bus = open_bus(self.can_config)

    def start(self) -> None:
        self.plant.terminal_voltage_v(0.0)  # load the model's kernels now, not in its first step
        self.attach()
        self._thread = threading.Thread(target=self._run, name="sim-pack", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    def _run(self) -> None:
        rate = RateKeeper(self.options.tx_period_s, lag_limit_s=math.inf)
        start_s, _ = rate.wait()
        pending = list(self.schedule)
        try:
            while not self._stop.is_set():
                now_s, dt_s = rate.wait()
                t_s = now_s - start_s
                while pending and pending[0].at_s <= t_s:
                    self.inject(pending.pop(0))
                self.tick(t_s, dt_s)
        except Exception:
            log.exception("simulated pack failed; its contactor box opens every relay")
            self.plant.relays = ALL_OPEN

    def tick(self, t_s: float, dt_s: float) -> None:
        """One step of the hardware: obey commands (or the dead-man), move, report."""
        if self.before_tick is not None:
            self.before_tick(t_s)
        self._receive_commands(t_s)
        if t_s - self._command_t_s > self.options.deadman_timeout_s:
            self._command = ALL_OPEN
        if t_s - self._balancing_t_s > self.options.balancing_timeout_s:
            self.plant.bleeding[:] = False  # the front-end stops bleeding without commands
        self.plant.step(dt_s, self.load(t_s), self._command)
        readings = self.plant.readings()
        self._send_feedback(readings)
        self._send(
            self.imd_message,
            {
                "InsulationResistance": readings.insulation_kohm,
                "MeasurementValid": int(t_s >= self.options.imd_startup_s),
                "Counter": self._counter,
            },
        )
        if not self.silenced:
            self._send_measurements(readings)

    def inject(self, injection: Injection) -> None:
        log.warning(
            "injecting fault %s%s",
            injection.kind,
            "" if injection.cell is None else f" on cell {injection.cell + 1}",
        )
        faults = self.plant.faults
        cell = injection.cell
        if injection.kind == "open_wire":
            faults.open_wire.add(cell)
        elif injection.kind == "stuck":
            faults.stuck[cell] = float(self.plant.readings().cell_voltage_v[cell])
        elif injection.kind == "nan":
            faults.nan.add(cell)
        elif injection.kind == "overtemp":
            faults.overtemp.add(cell)
        elif injection.kind == "short":
            faults.short = True
        elif injection.kind == "weld":
            faults.weld = True
        elif injection.kind == "silence":
            self.silenced = True
        elif injection.kind == "insulation":
            faults.insulation = True
        elif injection.kind == "interlock":
            faults.interlock = True

    # ---------------------------------------------------------------- CAN
    def _receive_commands(self, t_s: float) -> None:
        while (frame := self._bus.recv(timeout=0.0)) is not None:
            if frame.arbitration_id == self.balancing_message.frame_id:
                self._receive_balancing(t_s, bytes(frame.data))
                continue
            if frame.arbitration_id != self.command_message.frame_id:
                continue
            try:
                values = self.codec.decode(self.command_message, bytes(frame.data))
            except Exception:
                continue  # a corrupt command is ignored; the dead-man still runs
            if self.command_counter.advanced(values["Counter"]):  # a repeat is no refresh
                self._command = relays_from_signals(values)
                self._command_t_s = t_s

    def _receive_balancing(self, t_s: float, data: bytes) -> None:
        try:
            values = self.codec.decode(self.balancing_message, data)
        except Exception:
            return
        if self.balancing_counter.advanced(values["Counter"]):
            n_cells = self.plant.bleeding.size
            self.plant.bleeding = np.array(
                [values.get(f"Balance{i + 1}") == 1 for i in range(n_cells)]
            )
            self._balancing_t_s = t_s

    def _send(self, message, values) -> None:
        send_message(self._bus, self.encoder, message, values)

    def _send_feedback(self, readings) -> None:
        self._counter = (self._counter + 1) % 16
        self._send(
            self.feedback_message,
            {
                **relay_signals(readings.relays, self._counter),
                "InterlockClosed": int(readings.interlock_closed),
            },
        )

    def _send_measurements(self, r) -> None:
        voltages, temperatures = self.voltages, self.temperatures
        self._send_frames(voltages, self.voltage_frames, r.cell_voltage_v, r.cell_voltage_invalid)
        temps_c = np.round(r.cell_temp_c)  # the signal carries whole degrees
        self._send_frames(temperatures, self.temperature_frames, temps_c, r.cell_temp_invalid)
        self._send(
            self.pack,
            {
                "PackCurrent": r.current_a,
                "PackVoltage": r.pack_voltage_v,
                "LinkVoltage": r.link_voltage_v,
                "Counter": self._counter,
            },
        )

    def _send_frames(self, message, frames, values, invalid) -> None:
        """One frame per multiplexer group; signals past the pack's end read 0 (valid)."""
        for base, slots in frames:
            frame = {**base, "Counter": self._counter}
            for index, value_signal, flag_signal in slots:
                inside = index < values.size
                frame[value_signal] = float(values[index]) if inside else 0.0
                frame[flag_signal] = int(inside and bool(invalid[index]))
            self._send(message, frame)


def _frames(message, template: str, flag_template: str, count: int):
    """The frames that carry the first ``count`` values of ``message``'s ``template`` signals:
    per multiplexer group, the fixed signals (the multiplexer's value) and every
    (index, value signal, flag signal) in it, so each frame sets all of its signals."""
    by_name = {signal.name: signal for signal in message.signals}
    mux = next((signal.name for signal in message.signals if signal.is_multiplexer), None)
    groups: dict[int | None, list[tuple[int, str, str]]] = {}
    index = 0
    while (name := template.format(n=index + 1)) in by_name:
        mux_ids = by_name[name].multiplexer_ids or [None]
        flag = flag_template.format(n=index + 1)
        groups.setdefault(mux_ids[0], []).append((index, name, flag))
        index += 1
    if index < count:
        raise ValueError(f"{message.name} carries {index} values, the pack has {count}")
    return [
        ({} if mux_id is None else {mux: mux_id}, slots)
        for mux_id, slots in groups.items()
        if slots[0][0] < count
    ]
