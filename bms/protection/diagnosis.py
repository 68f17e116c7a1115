"""The diagnosis table: conditions become debounced faults, faults become actions.

As in foxBMS's ``diag_cfg.c`` the table is data: one row per fault with its id, the action it
takes and a description a person reads. Each row keeps an up/down counter (foxBMS's debounce):
a cycle with the condition present adds 1, a clean cycle takes away ``CLEAR_STEP``, and a cycle
where the condition cannot be judged (its signal is NaN, its stage failed) leaves the counter
alone. The fault becomes active when the counter reaches the row's debounce count (so N
consecutive cycles always suffice) and stays active until the counter is back at zero; a
condition that comes and goes therefore still trips instead of resetting forever.
An active ``OPEN_AFTER_DELAY`` fault opens the contactors and latches once it has been active
for ``open_delay_s`` and its condition still holds; ``OPEN_NOW`` latches at once. A latched
fault keeps the contactors open until a person clears it; the loop persists it
(bms/store/latches.py), so a restart keeps it too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import Field, model_validator

from bms.protection.limits import GRADED_QUANTITIES, GRADES
from bms.schema import StrictModel, suggest


class Action(enum.IntEnum):
    """What an active fault does, in rising order of severity; each includes the ones below
    (a fault that opens also forbids a close and derates to zero)."""

    WARN = 1
    DERATE = 2
    NO_CLOSE = 3
    OPEN_AFTER_DELAY = 4
    OPEN_NOW = 5


GRADE_ACTIONS = {"mol": Action.DERATE, "rsl": Action.NO_CLOSE, "msl": Action.OPEN_AFTER_DELAY}
GRADE_NAMES = {
    "mol": "maximum operating limit",
    "rsl": "recommended safety limit",
    "msl": "maximum safety limit",
}


CLEAR_STEP = 0.5
"""What a clean cycle takes off the counter: clearing needs twice as many cycles as setting."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    fault_id: str
    action: Action
    description: str
    debounce_cycles: int | None = None
    """Cycles to set this fault; None means the configured ``[diagnosis] debounce_cycles``."""


GRADED_ROWS: tuple[FaultSpec, ...] = tuple(
    FaultSpec(
        f"{quantity.fault_prefix}_{grade}",
        GRADE_ACTIONS[grade],
        f"{quantity.label} beyond its {GRADE_NAMES[grade]} ({quantity.field}.{grade})",
    )
    for quantity in GRADED_QUANTITIES
    for grade in GRADES
)
"""One row per quantity of the limit set and grade: MOL derates, RSL forbids a close and
derates to zero, MSL opens after the row's delay."""

FAULT_TABLE: tuple[FaultSpec, ...] = (
    *GRADED_ROWS,
    FaultSpec(
        "cell_voltage_invalid",
        Action.OPEN_AFTER_DELAY,
        "a cell voltage is missing, flagged invalid or not a number (open sense wire?)",
    ),
    FaultSpec(
        "cell_voltage_stuck",
        Action.OPEN_AFTER_DELAY,
        "a cell voltage did not change for stuck_time_s while current flowed",
    ),
    FaultSpec(
        "pack_voltage_mismatch",
        Action.OPEN_AFTER_DELAY,
        "the sum of the cells differs from the measured pack voltage",
    ),
    FaultSpec(
        "temperature_invalid",
        Action.OPEN_AFTER_DELAY,
        "a temperature is missing, flagged invalid or not a number",
    ),
    FaultSpec("short_circuit", Action.OPEN_NOW, "current above short_circuit_current_a"),
    FaultSpec("current_invalid", Action.OPEN_AFTER_DELAY, "the pack current is missing or NaN"),
    FaultSpec(
        "current_mismatch",
        Action.OPEN_AFTER_DELAY,
        "the two current sensors disagree by more than redundant_current_tolerance_a (and "
        "its fraction of the current): one of them is wrong, and we cannot tell which",
    ),
    FaultSpec(
        "current_redundant_invalid",
        Action.WARN,
        "the second current sensor gives no valid reading; the first is no longer checked",
    ),
    FaultSpec(
        "current_soc_mismatch",
        Action.WARN,
        "over charge_check_window_s the SOC the cell voltages show moved unlike the charge the "
        "current sensor counted, by more than charge_check_tolerance_a on average (current "
        "sensor offset or gain error, or a wrong capacity)",
        debounce_cycles=1,
    ),
    FaultSpec(
        "frontend_timeout", Action.OPEN_AFTER_DELAY, "front-end messages older than their timeout"
    ),
    FaultSpec("frontend_error", Action.OPEN_AFTER_DELAY, "the front-end failed to read"),
    *(
        FaultSpec(
            f"frontend_{name}",
            Action.NO_CLOSE,
            f"the front-end device's own {text} protection tripped (it may have switched "
            "its own FETs off); our own limits on the same readings do the opening",
        )
        for name, text in (
            ("cell_overvoltage", "cell over-voltage"),
            ("cell_undervoltage", "cell under-voltage"),
            ("pack_overvoltage", "pack over-voltage"),
            ("pack_undervoltage", "pack under-voltage"),
            ("overcurrent_charge", "charge over-current"),
            ("overcurrent_discharge", "discharge over-current"),
            ("overtemperature", "over-temperature"),
            ("undertemperature", "under-temperature"),
        )
    ),
    FaultSpec(
        "frontend_short_circuit",
        Action.OPEN_NOW,
        "the front-end device detected a short circuit",
        debounce_cycles=1,
    ),
    FaultSpec(
        "frontend_permanent_fail",
        Action.OPEN_NOW,
        "the front-end device latched a permanent failure",
        debounce_cycles=1,
    ),
    FaultSpec(
        "frontend_device_error",
        Action.OPEN_AFTER_DELAY,
        "the front-end device reports an internal error, is in its configuration mode, was "
        "reset and not yet configured again, or its status could not be read in time: its "
        "measurements cannot be trusted",
    ),
    FaultSpec(
        "frontend_current_sensor_fault",
        Action.OPEN_AFTER_DELAY,
        "the current sensor reports a fault of its own (its trim memory failed), or lost its "
        "calibration (a reset) and is being configured again: its current is invalid",
    ),
    FaultSpec(
        "frontend_config_mismatch",
        Action.OPEN_AFTER_DELAY,
        "the front-end reports another number of cells or temperature sensors than [pack] "
        "configures; its readings are refused",
    ),
    FaultSpec(
        "frontend_host_watchdog",
        Action.WARN,
        "the front-end device heard nothing from us for its own watchdog time",
    ),
    FaultSpec(
        "frontend_precharge_timeout", Action.WARN, "the front-end device's own precharge timed out"
    ),
    FaultSpec("frontend_fets_locked", Action.WARN, "the front-end device's FETs are locked off"),
    FaultSpec("frontend_charge_fet_off", Action.WARN, "the front-end device's charge FET is off"),
    FaultSpec(
        "frontend_discharge_fet_off", Action.WARN, "the front-end device's discharge FET is off"
    ),
    FaultSpec(
        "can_bus_off",
        Action.OPEN_AFTER_DELAY,
        "the CAN controller is bus-off, or the interface is down or gone (it is re-opened "
        "with back-off): nothing is received or sent",
    ),
    FaultSpec(
        "can_error_passive",
        Action.WARN,
        "the CAN controller is error-passive (an error counter at 128 or more): wiring, "
        "termination or a failing node",
    ),
    FaultSpec(
        "can_transmit_failed",
        Action.OPEN_AFTER_DELAY,
        "every CAN send failed for 0.25 s (nobody acknowledges, or the queue is full); the "
        "contactor box's dead-man opens its relays",
    ),
    FaultSpec("loop_lag", Action.OPEN_AFTER_DELAY, "the control loop wakes up late on average"),
    FaultSpec(
        "loop_stalled",
        Action.OPEN_NOW,
        "one wake-up came later than loop.stall_limit_s",
        debounce_cycles=1,
    ),
    FaultSpec(
        "internal_error",
        Action.OPEN_NOW,
        "a stage of the cycle raised an exception",
        debounce_cycles=1,
    ),
    FaultSpec(
        "insulation_warning",
        Action.WARN,
        "insulation resistance below insulation_warning_kohm",
    ),
    FaultSpec(
        "insulation_error",
        Action.OPEN_AFTER_DELAY,
        "insulation resistance below insulation_error_kohm",
    ),
    FaultSpec(
        "insulation_invalid",
        Action.OPEN_AFTER_DELAY,
        "no valid insulation reading (the monitor is still measuring, or silent); give the "
        "row an open_delay_s longer than the monitor's measuring time",
    ),
    FaultSpec(
        "interlock_open",
        Action.OPEN_AFTER_DELAY,
        "the high-voltage interlock loop is open (a connector or cover is off)",
    ),
    FaultSpec(
        "cell_model_mismatch",
        Action.WARN,
        "a cell's voltage stays further from the model's prediction than "
        "innovation_limit_sigma standard deviations (sensor, connection or cell fault?)",
        debounce_cycles=50,
    ),
    FaultSpec(
        "temperature_outside_model",
        Action.WARN,
        "a cell is colder or hotter than its parameter set was characterised for (by more "
        "than 5 degC): its SOC and state of power come from the nearest table row",
    ),
    FaultSpec(
        "soh_disagreement",
        Action.WARN,
        "a cell's capacity from the SOH model and from the online estimator are further apart "
        "than their combined uncertainty allows: one of them is wrong (bms/health)",
        debounce_cycles=1,
    ),
    FaultSpec(
        "latch_store_write_failed",
        Action.NO_CLOSE,
        "the latched faults could not be written to disk (retried every second)",
        debounce_cycles=1,
    ),
    FaultSpec(
        "latch_store_unreadable",
        Action.OPEN_NOW,
        "the file of latched faults could not be read; a person must clear it",
        debounce_cycles=1,
    ),
    FaultSpec(
        "store_write_failed",
        Action.WARN,
        "the state store cannot be written (disk full, read-only, locked by another "
        "process); writes are retried, and until then the SOC and the fault log are not saved",
        debounce_cycles=1,
    ),
    FaultSpec(
        "contactor_feedback_invalid",
        Action.OPEN_AFTER_DELAY,
        "contactor feedback is missing or stale",
    ),
    FaultSpec(
        "contactor_feedback_mismatch",
        Action.OPEN_NOW,
        "a contactor did not follow its command (opened by itself or failed to close)",
    ),
    FaultSpec(
        "contactor_weld", Action.OPEN_NOW, "a contactor stayed closed after being commanded open"
    ),
    FaultSpec(
        "contactor_open_unconfirmed",
        Action.OPEN_NOW,
        "the feedback could not confirm that the contactors opened",
    ),
    FaultSpec(
        "precharge_failed",
        Action.OPEN_NOW,
        "the DC link did not reach precharge_ratio of the pack voltage in time",
    ),
    FaultSpec(
        "precharge_too_fast",
        Action.OPEN_NOW,
        "the DC link charged in less than precharge_min_s: no precharge resistor in its path "
        "(a welded positive contactor) or no capacitance on it (the load is disconnected)",
    ),
    FaultSpec(
        "link_voltage_held",
        Action.OPEN_NOW,
        "link_decay_s after the contactors opened, the DC link is still above "
        "link_decay_ratio of the pack voltage (a welded contact the feedback does not show, "
        "or a source such as a charger on the link)",
    ),
)

FAULTS: Mapping[str, FaultSpec] = {spec.fault_id: spec for spec in FAULT_TABLE}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The table's decision for one cycle."""

    active: tuple[str, ...]
    latched: tuple[str, ...]
    no_close: bool
    newly_latched: tuple[str, ...]

    @property
    def open_now(self) -> bool:
        """Any latched fault holds the contactors open."""
        return bool(self.latched)


class RowSettings(StrictModel):
    """Per-row overrides of the table's defaults (``[diagnosis.rows.FAULT_ID]``)."""

    debounce_cycles: int | None = Field(None, ge=1, le=100)
    open_delay_s: float | None = Field(None, ge=0.0, le=60.0)
    enabled: bool = True


class DiagnosisConfig(StrictModel):
    """The ``[diagnosis]`` section: defaults for every row, and per-row settings."""

    debounce_cycles: int = Field(3, ge=1, le=1000)
    open_delay_s: float = Field(0.5, ge=0.0, le=60.0)
    rows: dict[str, RowSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rows_exist_and_safety_rows_stay_on(self) -> DiagnosisConfig:
        problems = []
        for fault_id, row in self.rows.items():
            spec = FAULTS.get(fault_id)
            if spec is None:
                problems.append(f"no fault {fault_id!r}{suggest(fault_id, list(FAULTS))}")
                continue
            if not row.enabled and spec.action >= Action.NO_CLOSE:
                problems.append(f"{fault_id} keeps the contactors open and cannot be disabled")
            if row.debounce_cycles is not None and spec.debounce_cycles is not None:
                problems.append(f"{fault_id} acts on its first cycle; its debounce is fixed")
            if row.open_delay_s is not None and spec.action is not Action.OPEN_AFTER_DELAY:
                problems.append(f"{fault_id} has no open delay to set")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def row(self, fault_id: str) -> RowSettings:
        """The row's settings with the defaults filled in."""
        spec = FAULTS[fault_id]
        row = self.rows.get(fault_id, RowSettings())
        return RowSettings(
            debounce_cycles=row.debounce_cycles or spec.debounce_cycles or self.debounce_cycles,
            open_delay_s=self.open_delay_s if row.open_delay_s is None else row.open_delay_s,
            enabled=row.enabled,
        )


class Diagnosis:
    """Debounces conditions into faults and latches the ones that open the contactors."""

    def __init__(self, config: DiagnosisConfig, latched: Iterable[str] = ()):
        """``latched``: faults latched before a restart; they hold the contactors open from
        the first cycle (an id this table does not know stays latched too). Their counters
        start full, as if the cause were present, so a clear waits until this run has
        judged the cause absent for long enough to drain them."""
        self._counts = dict.fromkeys(FAULTS, 0.0)
        self._active = dict.fromkeys(FAULTS, False)
        self._active_s = dict.fromkeys(FAULTS, 0.0)
        self._latched: dict[str, None] = dict.fromkeys(latched)
        self.reconfigure(config)
        for fault_id in self._latched.keys() & FAULTS.keys():
            self._counts[fault_id] = float(self._needed[fault_id])
            self._active[fault_id] = True

    def reconfigure(self, config: DiagnosisConfig) -> None:
        """Take (new) row settings; counters, activity and latches carry over, a counter
        capped at its row's (new) debounce count."""
        rows = {fault_id: config.row(fault_id) for fault_id in FAULTS}
        self._needed = {fault_id: row.debounce_cycles for fault_id, row in rows.items()}
        self._delay_s = {fault_id: row.open_delay_s for fault_id, row in rows.items()}
        self._enabled = {fault_id for fault_id, row in rows.items() if row.enabled}
        for fault_id, needed in self._needed.items():
            self._counts[fault_id] = min(self._counts[fault_id], needed)

    def update(self, conditions: Mapping[str, bool | None], dt_s: float) -> Verdict:
        """Take this cycle's raw conditions and return the verdict.

        ``conditions`` maps fault ids to True (present), False (absent) or None (cannot be
        judged this cycle); a fault id left out counts as absent. A stage that reports a fault
        (the contactor state machine, say) keeps reporting it for as long as it holds.
        """
        unknown = set(conditions) - FAULTS.keys()
        if unknown:
            raise KeyError(f"conditions not in the diagnosis table: {sorted(unknown)}")
        newly_latched = []
        for fault_id, spec in FAULTS.items():
            present = conditions.get(fault_id, False) if fault_id in self._enabled else False
            needed = self._needed[fault_id]
            if present:
                self._counts[fault_id] = min(self._counts[fault_id] + 1.0, needed)
            elif present is not None:
                self._counts[fault_id] = max(self._counts[fault_id] - CLEAR_STEP, 0.0)
            was_active = self._active[fault_id]
            active = self._counts[fault_id] >= needed or (was_active and self._counts[fault_id] > 0)
            self._active[fault_id] = active
            if not active:
                continue
            # The open delay counts from the cycle the fault became active.
            self._active_s[fault_id] = self._active_s[fault_id] + dt_s if was_active else 0.0
            # It latches only while the condition still holds: a fault whose count is draining
            # after the cause went away does not latch when its delay runs out.
            opens = present is not False and (
                spec.action is Action.OPEN_NOW
                or (
                    spec.action is Action.OPEN_AFTER_DELAY
                    and self._active_s[fault_id] >= self._delay_s[fault_id]
                )
            )
            if opens and fault_id not in self._latched:
                self._latched[fault_id] = None
                newly_latched.append(fault_id)
        # A close waits until every row that forbids one has cleared completely, not merely
        # until nothing is debounced: no precharge starts while a condition is still present.
        no_close = bool(self._latched) or any(
            self._counts[f] > 0 for f, spec in FAULTS.items() if spec.action >= Action.NO_CLOSE
        )
        return Verdict(
            active=tuple(f for f in FAULTS if self._active[f]),
            latched=tuple(self._latched),
            no_close=no_close,
            newly_latched=tuple(newly_latched),
        )

    def cause_present(self, fault_id: str) -> bool:
        """Whether the fault's condition was present recently (its counter is above zero or
        it is still active); an id the table does not know has no cause to see."""
        return fault_id in FAULTS and (self._counts[fault_id] > 0 or self._active[fault_id])

    def clear(self, fault_id: str) -> None:
        """Unlatch ``fault_id`` (a person's decision; the caller checked its cause is gone)
        and reset its counter, so a cause judged elsewhere (the contactor state machine)
        must be found again to latch again."""
        self._latched.pop(fault_id, None)
        if fault_id in FAULTS:
            self._counts[fault_id] = 0.0
            self._active[fault_id] = False
