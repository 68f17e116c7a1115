"""The diagnosis table: conditions become debounced faults, faults become actions.

As in foxBMS's ``diag_cfg.c`` the table is data: one row per fault with its id, the action it
takes and a description a person reads. A condition must hold for ``debounce_cycles``
consecutive cycles before its fault is active; an active fault with ``OPEN_AFTER_DELAY`` opens
the contactors (and latches) once it has been active for ``open_delay_s``; ``OPEN_NOW`` latches
at once. A latched fault stays latched (and the contactors open) until it is cleared by an
explicit request, which the walking skeleton does not offer yet: a latch lasts until restart.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Action(enum.IntEnum):
    """What an active fault does, in rising order of severity."""

    WARN = 1
    NO_CLOSE = 2
    OPEN_AFTER_DELAY = 3
    OPEN_NOW = 4


@dataclass(frozen=True, slots=True)
class FaultSpec:
    fault_id: str
    action: Action
    description: str


FAULT_TABLE: tuple[FaultSpec, ...] = (
    FaultSpec("cell_overvoltage", Action.OPEN_AFTER_DELAY, "a cell is above cell_voltage_max_v"),
    FaultSpec("cell_undervoltage", Action.OPEN_AFTER_DELAY, "a cell is below cell_voltage_min_v"),
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
    FaultSpec("overtemperature", Action.OPEN_AFTER_DELAY, "a cell is above temp_max_c"),
    FaultSpec("undertemperature", Action.OPEN_AFTER_DELAY, "a cell is below temp_min_c"),
    FaultSpec(
        "temperature_invalid",
        Action.OPEN_AFTER_DELAY,
        "a temperature is missing, flagged invalid or not a number",
    ),
    FaultSpec(
        "charge_overcurrent", Action.OPEN_AFTER_DELAY, "charge current above charge_current_max_a"
    ),
    FaultSpec(
        "discharge_overcurrent",
        Action.OPEN_AFTER_DELAY,
        "discharge current above discharge_current_max_a",
    ),
    FaultSpec("short_circuit", Action.OPEN_NOW, "current above short_circuit_current_a"),
    FaultSpec("current_invalid", Action.OPEN_AFTER_DELAY, "the pack current is missing or NaN"),
    FaultSpec(
        "frontend_timeout", Action.OPEN_AFTER_DELAY, "front-end messages older than their timeout"
    ),
    FaultSpec("frontend_error", Action.OPEN_AFTER_DELAY, "the front-end failed to read"),
    FaultSpec("loop_lag", Action.OPEN_AFTER_DELAY, "the control loop wakes up late on average"),
    FaultSpec("internal_error", Action.OPEN_NOW, "a stage of the cycle raised an exception"),
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
        "precharge_failed",
        Action.OPEN_NOW,
        "the DC link did not reach precharge_ratio of the pack voltage in time",
    ),
)

FAULTS: Mapping[str, FaultSpec] = {spec.fault_id: spec for spec in FAULT_TABLE}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The table's decision for one cycle."""

    active: tuple[str, ...]
    latched: tuple[str, ...]
    open_now: bool
    no_close: bool
    newly_latched: tuple[str, ...]


class Diagnosis:
    """Debounces conditions into faults and latches the ones that open the contactors."""

    def __init__(self, debounce_cycles: int, open_delay_s: float):
        self.debounce_cycles = debounce_cycles
        self.open_delay_s = open_delay_s
        self._counts = dict.fromkeys(FAULTS, 0)
        self._active_s = dict.fromkeys(FAULTS, 0.0)
        self._latched: dict[str, None] = {}

    def update(self, conditions: Mapping[str, bool], dt_s: float) -> Verdict:
        """Take this cycle's raw conditions (fault id -> present) and return the verdict.

        Every condition is debounced the same way, so a stage that reports a fault (the
        contactor state machine, say) keeps reporting it for as long as it holds.
        """
        unknown = set(conditions) - FAULTS.keys()
        if unknown:
            raise KeyError(f"conditions not in the diagnosis table: {sorted(unknown)}")
        active = []
        newly_latched = []
        for fault_id, spec in FAULTS.items():
            was_active = self._counts[fault_id] >= self.debounce_cycles
            if conditions.get(fault_id, False):
                self._counts[fault_id] = min(self._counts[fault_id] + 1, self.debounce_cycles)
            else:
                self._counts[fault_id] = 0
                self._active_s[fault_id] = 0.0
                continue
            if self._counts[fault_id] < self.debounce_cycles:
                continue
            active.append(fault_id)
            # The open delay counts from the cycle the fault became active.
            self._active_s[fault_id] = self._active_s[fault_id] + dt_s if was_active else 0.0
            opens = spec.action is Action.OPEN_NOW or (
                spec.action is Action.OPEN_AFTER_DELAY
                and self._active_s[fault_id] >= self.open_delay_s
            )
            if opens and fault_id not in self._latched:
                self._latched[fault_id] = None
                newly_latched.append(fault_id)
        no_close = any(FAULTS[f].action >= Action.NO_CLOSE for f in active)
        return Verdict(
            active=tuple(active),
            latched=tuple(self._latched),
            open_now=bool(self._latched),
            no_close=no_close or bool(self._latched),
            newly_latched=tuple(newly_latched),
        )
