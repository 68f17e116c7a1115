"""Status frames on CAN: state, SOC, limits and cell extremes, every cycle."""

from __future__ import annotations

import math

from bms.backends import Publisher
from bms.config import BmsConfig
from bms.report import pack_summary
from bms.schema import StrictModel
from bms.types import ContactorState, PackStatus
from drivers.can.link import CanBackend, CanLink

STATE_CODES = {
    ContactorState.OPEN: 0,
    ContactorState.PRECHARGE: 1,
    ContactorState.CLOSED: 2,
    ContactorState.OPENING: 3,
    ContactorState.FAULT: 4,
}


class CanPublisherOptions(StrictModel):
    status_message: str = "BMS_Status"
    limits_message: str = "BMS_Limits"
    cell_stats_message: str = "BMS_CellStats"


class CanPublisher(CanBackend, Publisher):
    Options = CanPublisherOptions

    def __init__(self, config: BmsConfig, options: CanPublisherOptions):
        self.link = CanLink.acquire(config)
        with self.link.released_on_error() as link:
            codec = link.codec
            self.status = codec.message(
                options.status_message,
                (
                    "ContactorState",
                    "Counter",
                    "ActiveFaultCount",
                    "LatchedFaultCount",
                    "SocMean",
                    "TempMax",
                    "TempMin",
                ),
            )
            self.limits = codec.message(
                options.limits_message, ("ChargeLimit", "DischargeLimit", "PackCurrent")
            )
            self.cell_stats = codec.message(
                options.cell_stats_message,
                ("CellVoltageMin", "CellVoltageMax", "CellVoltageMinCell", "CellVoltageMaxCell"),
            )
        self._counter = 0

    def publish(self, status: PackStatus) -> None:
        self._counter = (self._counter + 1) % 16
        summary = pack_summary(status)
        self.link.send(
            self.status,
            {
                "ContactorState": STATE_CODES[status.contactors],
                "Counter": self._counter,
                "ActiveFaultCount": min(len(status.active_faults), 255),
                "LatchedFaultCount": min(len(status.latched_faults), 255),
                "SocMean": summary["soc_mean"],
                "TempMax": _rounded(summary["temp_max_c"]),
                "TempMin": _rounded(summary["temp_min_c"]),
            },
        )
        self.link.send(
            self.limits,
            {
                "ChargeLimit": _floor_to_resolution(
                    status.charge_limit_a, self.limits, "ChargeLimit"
                ),
                "DischargeLimit": _floor_to_resolution(
                    status.discharge_limit_a, self.limits, "DischargeLimit"
                ),
                "PackCurrent": status.measurement.current_a,
            },
        )
        self.link.send(
            self.cell_stats,
            {
                "CellVoltageMin": summary["cell_voltage_min_v"],
                "CellVoltageMax": summary["cell_voltage_max_v"],
                "CellVoltageMinCell": summary["cell_voltage_min_cell"] or 0,
                "CellVoltageMaxCell": summary["cell_voltage_max_cell"] or 0,
            },
        )


def _rounded(temp_c: float) -> float:
    """Whole degrees for the 1 degC signal; NaN stays NaN (sent as "not available")."""
    return temp_c if math.isnan(temp_c) else float(round(temp_c))


def _floor_to_resolution(limit_a: float, message, signal_name: str) -> float:
    """A current limit rounded down to the signal's resolution: never above what was allowed."""
    scale = message.get_signal_by_name(signal_name).scale
    return math.floor(limit_a / scale + 1e-9) * scale
