"""Samples and states passed between the stages of the cycle.

Units are in every name; current is positive when charging; cells are indexed from 0.
A value that is missing, late or implausible is NaN, never a silently replaced number.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

CELL_VOLTAGE_GROUP = "cell_voltage"
"""Names of the front-end's signal groups, as reported in ``Measurement.stale_groups``."""
TEMPERATURE_GROUP = "temperature"
PACK_GROUP = "pack"
INSULATION_GROUP = "insulation"


@dataclass(slots=True)
class Measurement:
    """One timestamped sample from the front-end.

    ``cell_voltage_v``: (n_cells,), ``cell_temp_c``: (n_temp_sensors,). NaN marks an invalid
    or stale value. ``stale_groups`` names the signal groups older than their timeout.
    """

    t_s: float
    cell_voltage_v: np.ndarray
    cell_temp_c: np.ndarray
    current_a: float
    pack_voltage_v: float
    link_voltage_v: float
    insulation_kohm: float = math.nan
    """Insulation resistance to chassis; NaN when there is no valid reading (or no monitor)."""
    redundant_current_a: float = math.nan
    """A second, independent measurement of the pack current (a front-end's own coulomb
    counter beside the shunt monitor, say); NaN where there is none. Checked against
    ``current_a`` by plausibility."""
    stale_groups: tuple[str, ...] = ()
    frame_errors: int = 0
    frontend_faults: tuple[str, ...] = ()
    """Diagnosis-table fault ids the front-end itself found this cycle (its bus is off, the
    device reports a safety alert); each is present while it is listed."""


@dataclass(frozen=True, slots=True)
class RelayStates:
    """The three relays of the contactor box: negative, precharge and positive (True = closed)."""

    negative: bool = False
    precharge: bool = False
    positive: bool = False

    @property
    def any_closed(self) -> bool:
        return self.negative or self.precharge or self.positive


ALL_OPEN = RelayStates()


@dataclass(frozen=True, slots=True)
class ContactorFeedback:
    """Auxiliary-contact feedback; ``valid`` is False when the feedback is missing or stale."""

    relays: RelayStates
    valid: bool
    interlock_closed: bool | None = None
    """The high-voltage interlock loop, where the box watches one (None: not reported)."""


class ContactorState(enum.Enum):
    """States of the contactor state machine; the values are what status output shows."""

    OPEN = "open"
    PRECHARGE = "precharge"
    CLOSED = "closed"
    OPENING = "opening"
    FAULT = "fault"


POWER_DURATIONS_S = (2.0, 10.0, 30.0)
"""The pulse lengths state of power is given for."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """The estimator's picture of every cell: arrays (n_cells,), NaN for a cell with no
    estimate yet; current limits (n_cells, len(POWER_DURATIONS_S)) in A, positive magnitudes,
    for the whole parallel group."""

    soc: np.ndarray
    soc_std: np.ndarray
    innovation_v: np.ndarray
    """Measured minus predicted cell voltage; NaN where the cell was not updated."""
    innovation_std_v: np.ndarray
    charge_limit_a: np.ndarray
    discharge_limit_a: np.ndarray
    outside_model: np.ndarray
    """Cells whose temperature is beyond the parameter set's by more than a margin: the
    tables are clamped there, so their estimate and state of power are extrapolations."""
    restarted: np.ndarray
    """Cells (re)started from their OCV this step (first seen, or after a long rest): their
    SOC jumped for a reason other than current or a voltage correction."""

    def pack_limits_a(self, duration_s: float) -> tuple[float, float]:
        """(charge, discharge) current the weakest cell allows for ``duration_s`` (one of
        POWER_DURATIONS_S); NaN while any cell has no estimate."""
        d = POWER_DURATIONS_S.index(duration_s)
        return (
            float(np.min(self.charge_limit_a[:, d])),
            float(np.min(self.discharge_limit_a[:, d])),
        )


@dataclass(slots=True)
class PackStatus:
    """What one cycle concluded: the published picture of the pack."""

    t_s: float
    contactors: ContactorState
    estimate: Estimate
    measurement: Measurement
    active_faults: tuple[str, ...]
    latched_faults: tuple[str, ...]
    charge_limit_a: float
    discharge_limit_a: float
    balancing: np.ndarray | None = None
    """Cells bleeding this cycle (n_cells,), or None where balancing is off."""
    health: object | None = None
    """The newest state of health (bms.health.service.PackHealth), or None."""

    @property
    def soc(self) -> np.ndarray:
        return self.estimate.soc
