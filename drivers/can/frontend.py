"""A cell-monitoring front-end on CAN, decoded through the DBC.

Signals follow one naming rule, checked against the DBC when the backend opens: cell ``i``
(counting from 0) is ``Cell{i+1}_Voltage`` with its flag ``Cell{i+1}_VoltageInvalid``,
temperature sensor ``j`` is ``Temp{j+1}`` with ``Temp{j+1}_Invalid``, and the pack message
carries ``PackCurrent``, ``PackVoltage`` and ``LinkVoltage``. Every value keeps the time it was
received; one older than its group's timeout is NaN and its group is reported stale.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from pydantic import Field

from bms.backends import FrontEnd
from bms.comms.dbc import DbcError
from bms.config import BmsConfig
from bms.schema import StrictModel
from bms.types import (
    CELL_VOLTAGE_GROUP,
    INSULATION_GROUP,
    PACK_GROUP,
    TEMPERATURE_GROUP,
    Measurement,
)
from drivers.can.link import CanBackend, CanLink, RollingCounter

log = logging.getLogger(__name__)


class CanFrontEndOptions(StrictModel):
    cell_voltage_message: str = "CMU_CellVoltages"
    temperature_message: str = "CMU_CellTemperatures"
    pack_message: str = "CMU_PackMeasurements"
    cell_voltage_timeout_s: float = Field(0.5, gt=0.0, le=60.0)
    temperature_timeout_s: float = Field(1.0, gt=0.0, le=60.0)
    pack_timeout_s: float = Field(0.5, gt=0.0, le=60.0)
    insulation_message: str = Field(
        "IMD_Info", description="read when [protection] sets insulation thresholds"
    )
    insulation_timeout_s: float = Field(2.0, gt=0.0, le=60.0)
    balancing_message: str = "BMS_BalancingCommand"


class _Group:
    """Values of one signal group with the time each was last received.

    With a ``counter`` (the message's rolling counter), a frame that repeats the previous
    count is ignored, so a frozen sender goes stale instead of looking alive. With a
    ``valid_flag``, a frame whose flag is not 1 makes the group's values NaN (fresh but
    invalid: a device that is still measuring).
    """

    def __init__(
        self,
        names: list[str],
        invalid_names: list[str | None],
        timeout_s: float,
        counter: RollingCounter | None = None,
        valid_flag: str | None = None,
    ):
        self.index = {name: i for i, name in enumerate(names)}
        self.invalid_index = {name: i for i, name in enumerate(invalid_names) if name}
        self.values = np.full(len(names), np.nan)
        self.rx_t_s = np.full(len(names), -np.inf)
        self.timeout_s = timeout_s
        self.counter = counter
        self.valid_flag = valid_flag

    def update(self, t_s: float, decoded: dict[str, float]) -> None:
        if self.counter is not None and not self.counter.advanced(decoded["Counter"]):
            return
        for name, value in decoded.items():
            i = self.index.get(name)
            if i is not None:
                self.values[i] = value
                self.rx_t_s[i] = t_s
        for name, i in self.invalid_index.items():
            if decoded.get(name, 0) == 1:  # NaN flag (not available) reads as "not invalid"
                self.values[i] = np.nan
        if self.valid_flag is not None and decoded.get(self.valid_flag) != 1:
            self.values[:] = np.nan

    def read(self, t_s: float) -> tuple[np.ndarray, bool]:
        """Return (values with stale ones as NaN, whether any is stale)."""
        stale = (t_s - self.rx_t_s) > self.timeout_s
        return np.where(stale, np.nan, self.values), bool(stale.any())


class CanFrontEnd(CanBackend, FrontEnd):
    """Reads cell voltages, temperatures and pack measurements from CAN frames, and commands
    the cells' bleed resistors."""

    Options = CanFrontEndOptions
    supports_balancing = True

    def __init__(self, config: BmsConfig, options: CanFrontEndOptions):
        n_cells = config.pack.n_cells
        n_temps = config.pack.n_temp_sensors
        cells = [f"Cell{i + 1}_Voltage" for i in range(n_cells)]
        cell_flags = [f"Cell{i + 1}_VoltageInvalid" for i in range(n_cells)]
        temps = [f"Temp{j + 1}" for j in range(n_temps)]
        temp_flags = [f"Temp{j + 1}_Invalid" for j in range(n_temps)]
        pack = ["PackCurrent", "PackVoltage", "LinkVoltage"]
        self.pack_counter = RollingCounter()
        self.link = CanLink.acquire(config)
        with self.link.released_on_error() as link:
            cell_message = link.codec.message(options.cell_voltage_message, cells + cell_flags)
            temp_message = link.codec.message(options.temperature_message, temps + temp_flags)
            pack_message = link.codec.message(options.pack_message, [*pack, "Counter"])
            self.balancing_message = link.codec.message(
                options.balancing_message,
                [f"Balance{i + 1}" for i in range(n_cells)] + ["Counter"],
            )
            insulation_message = None
            if config.protection.insulation_error_kohm is not None:
                insulation_message = link.codec.message(
                    options.insulation_message,
                    ["InsulationResistance", "MeasurementValid", "Counter"],
                )
            limits = config.limits
            _check_measurable(
                cell_message,
                cells[0],
                limits.cell_voltage_low_v.msl,
                limits.cell_voltage_high_v.msl,
            )
            _check_measurable(
                temp_message,
                temps[0],
                min(limits.temp_low_charge_c.msl, limits.temp_low_discharge_c.msl),
                max(limits.temp_high_charge_c.msl, limits.temp_high_discharge_c.msl),
            )
            short_a = config.protection.short_circuit_current_a
            _check_measurable(pack_message, "PackCurrent", -short_a, short_a)
        self.cells = _Group(cells, cell_flags, options.cell_voltage_timeout_s)
        self.temps = _Group(temps, temp_flags, options.temperature_timeout_s)
        self.pack = _Group(pack, [None] * 3, options.pack_timeout_s, self.pack_counter)
        groups = [(cell_message, self.cells), (temp_message, self.temps), (pack_message, self.pack)]
        self.insulation: _Group | None = None
        if insulation_message is not None:
            self.insulation = _Group(
                ["InsulationResistance"],
                [None],
                options.insulation_timeout_s,
                RollingCounter(),
                valid_flag="MeasurementValid",
            )
            groups.append((insulation_message, self.insulation))
        self.frame_errors = 0
        self._balance_counter = 0
        self._balance_signals = [
            signal.name for signal in self.balancing_message.signals if signal.name != "Counter"
        ]
        for message, group in groups:
            self.link.subscribe(message.frame_id, self._handler(message, group))

    def _handler(self, message, group: _Group):
        codec = self.link.codec

        def handle(t_s: float, data: bytes) -> None:
            try:
                decoded = codec.decode(message, data)
            except Exception as exc:  # cantools raises several types for malformed frames
                self.frame_errors += 1
                if self.frame_errors == 1 or self.frame_errors % 1000 == 0:
                    log.warning(
                        "malformed %s frame %s (%d so far): %s",
                        message.name,
                        data.hex(),
                        self.frame_errors,
                        exc,
                    )
                return
            group.update(t_s, decoded)

        return handle

    def balance(self, cells: np.ndarray) -> None:
        self._balance_counter = (self._balance_counter + 1) % 16
        values = dict.fromkeys(self._balance_signals, 0)
        for index in np.flatnonzero(cells):
            values[f"Balance{index + 1}"] = 1
        values["Counter"] = self._balance_counter
        self.link.send(self.balancing_message, values)

    def read(self, t_s: float) -> Measurement:
        self.link.poll(t_s)
        cell_voltage_v, cells_stale = self.cells.read(t_s)
        cell_temp_c, temps_stale = self.temps.read(t_s)
        (current_a, pack_voltage_v, link_voltage_v), pack_stale = self.pack.read(t_s)
        insulation_kohm, insulation_stale = math.nan, False
        if self.insulation is not None:
            (insulation_kohm,), insulation_stale = self.insulation.read(t_s)
        stale = tuple(
            name
            for name, is_stale in (
                (CELL_VOLTAGE_GROUP, cells_stale),
                (TEMPERATURE_GROUP, temps_stale),
                (PACK_GROUP, pack_stale),
                (INSULATION_GROUP, insulation_stale),
            )
            if is_stale
        )
        return Measurement(
            t_s=t_s,
            cell_voltage_v=cell_voltage_v,
            cell_temp_c=cell_temp_c,
            current_a=float(current_a),
            pack_voltage_v=float(pack_voltage_v),
            link_voltage_v=float(link_voltage_v),
            insulation_kohm=float(insulation_kohm),
            stale_groups=stale,
            frame_errors=self.frame_errors,
        )


def _check_measurable(message, signal_name: str, low_limit: float, high_limit: float) -> None:
    """A protection limit at or beyond what the DBC signal can carry could never trip."""
    signal = next(sig for sig in message.signals if sig.name == signal_name)
    if not (signal.minimum < low_limit and high_limit < signal.maximum):
        raise DbcError(
            f"{message.name}.{signal_name} carries {signal.minimum:g}..{signal.maximum:g} "
            f"{signal.unit}: the protection limits {low_limit:g}..{high_limit:g} must lie "
            "strictly inside it, or they could never trip"
        )
