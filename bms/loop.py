"""The rate keeper and the cycle.

The rate keeper (openpilot ``common/realtime.py``, ros2_control's sleep policy) wakes the loop on
the monotonic clock, passes on the *measured* dt, re-phases after an overrun instead of bursting
to catch up, counts the missed cycles, and reports sustained lateness as ``lagging``.

The cycle runs the stages of DESIGN.md in order: read, validate, estimate, protect, actuate,
publish. Nothing raises past a cycle: a stage that fails becomes the ``internal_error`` or
``frontend_error`` fault, and the contactors open.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bms.backends import ContactorDriver, FrontEnd, Publisher
from bms.config import BmsConfig
from bms.estimation.cell_params import CellParams
from bms.estimation.estimator import Estimate, PackEstimator
from bms.protection.balancing import Balancer
from bms.protection.contactors import ContactorStateMachine
from bms.protection.derating import CurrentLimiter
from bms.protection.diagnosis import FAULTS, Action, Diagnosis
from bms.protection.plausibility import (
    ChargeCrossCheck,
    StuckDetector,
    estimator_conditions,
    graded_conditions,
    measurement_conditions,
)
from bms.store import utc_now_iso
from bms.store.latches import LatchRecord, LatchStore
from bms.types import ALL_OPEN, ContactorFeedback, ContactorState, Measurement, PackStatus

log = logging.getLogger(__name__)

LAG_AVERAGE_S = 1.0
"""Time constant of the lateness average that decides ``lagging``."""


class RateKeeper:
    """Keeps a fixed period on an injectable monotonic clock."""

    def __init__(
        self,
        period_s: float,
        lag_limit_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.period_s = period_s
        self.lag_limit_s = lag_limit_s
        self.clock = clock
        self.sleep = sleep
        self.missed_cycles = 0
        self.last_lateness_s = 0.0
        self.lateness_avg_s = 0.0
        self._alpha = min(1.0, period_s / LAG_AVERAGE_S)
        self._next_s = clock()
        self._last_wake_s: float | None = None

    @property
    def lagging(self) -> bool:
        return self.lateness_avg_s > self.lag_limit_s

    def wait(self) -> tuple[float, float]:
        """Sleep until the next deadline; return (wake-up time, measured dt since last wake).

        The first call returns dt = 0. If the deadline was missed by a whole period or more,
        the schedule restarts from now and the skipped cycles are counted, not run.
        """
        remaining = self._next_s - self.clock()
        if remaining > 0.0:
            self.sleep(remaining)
        now = self.clock()
        lateness = max(0.0, now - self._next_s)
        self.last_lateness_s = lateness
        self.lateness_avg_s += self._alpha * (lateness - self.lateness_avg_s)
        if lateness >= self.period_s:
            self.missed_cycles += int(lateness // self.period_s)
            self._next_s = now + self.period_s
        else:
            self._next_s += self.period_s
        dt = 0.0 if self._last_wake_s is None else now - self._last_wake_s
        self._last_wake_s = now
        return now, dt


@dataclass(slots=True)
class CycleTiming:
    """Cycle compute times over one status interval."""

    count: int = 0
    total_s: float = 0.0
    worst_s: float = 0.0

    def add(self, compute_s: float) -> None:
        self.count += 1
        self.total_s += compute_s
        self.worst_s = max(self.worst_s, compute_s)

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0


class StageErrors:
    """Logs a failing stage without flooding: the traceback once, then a count every
    ``interval_s`` while it keeps failing (DESIGN.md: repeating faults are rate-limited)."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.counts: dict[str, int] = {}
        self._logged_s: dict[str, float] = {}

    def report(self, stage: str, problem: str | None = None) -> None:
        """Call from an ``except`` block, or with the ``problem`` described."""
        count = self.counts[stage] = self.counts.get(stage, 0) + 1
        now_s = self.clock()
        if count == 1:
            if problem is None:
                log.exception("%s failed", stage)
            else:
                log.error("%s failed: %s", stage, problem)
        elif now_s - self._logged_s[stage] < self.interval_s:
            return
        else:
            latest = problem if problem is not None else sys.exc_info()[1]
            log.error("%s failed %d times so far; latest: %s", stage, count, latest)
        self._logged_s[stage] = now_s


class ControlCycle:
    """One cycle of the BMS, with the state that persists between cycles."""

    def __init__(
        self,
        config: BmsConfig,
        cell: CellParams,
        frontend: FrontEnd,
        contactors: ContactorDriver,
        publisher: Publisher | None,
        latch_store: LatchStore | None = None,
    ):
        """``latch_store``: where latched faults persist; those found there at start hold the
        contactors open from the first cycle. None keeps latches in memory only (tests)."""
        self.config = config
        self.frontend = frontend
        self.contactors = contactors
        self.publisher = publisher
        n_cells = config.pack.n_cells
        protection = config.protection
        self.estimator = PackEstimator(
            cell,
            n_cells,
            config.pack.n_temp_sensors,
            config.soc.rest_current_a,
            config.soc.rest_time_s,
            config.pack.n_parallel,
            config.loop.period_s,
            # Published limits must not lead the cells past their operating limits.
            (config.limits.cell_voltage_low_v.mol, config.limits.cell_voltage_high_v.mol),
        )
        self.estimate: Estimate = self.estimator.unknown()
        self.stuck = StuckDetector(n_cells, protection.stuck_time_s, protection.stuck_min_current_a)
        self.charge_check: ChargeCrossCheck | None = None
        if protection.charge_check_tolerance_a is not None:
            self.charge_check = ChargeCrossCheck(
                protection.charge_check_window_s,
                cell.capacity_ah * config.pack.n_parallel,
                protection.charge_check_tolerance_a,
            )
        self.latch_store = latch_store
        self.latch_records: dict[str, LatchRecord] = {}
        self._latches_unsaved = False
        self._latch_write_failed = False
        self._latch_tried_s = -math.inf
        if latch_store is not None:
            self.latch_records = latch_store.open_for_run()
            if self.latch_records:
                log.warning(
                    "latched before this start, contactors stay open until cleared "
                    "(bms faults clear): %s",
                    ", ".join(self.latch_records),
                )
        self.diagnosis = Diagnosis(config.diagnosis, latched=self.latch_records)
        self.limiter = CurrentLimiter(config.limits, config.derating, config.pack.n_parallel)
        self.balancer: Balancer | None = None
        if config.balancing.enabled:
            if frontend.supports_balancing:
                self.balancer = Balancer(
                    config.balancing, n_cells, cell.capacity_ah * config.pack.n_parallel
                )
            else:
                log.warning(
                    "[balancing] is enabled but the %s front-end cannot balance",
                    config.frontend.name,
                )
        self.fsm = ContactorStateMachine(config.control)
        self.close_requested = config.control.close_on_start
        self.protection_failed = False
        self.errors = StageErrors()
        self._last_state = ContactorState.OPEN
        self._empty = Measurement(
            t_s=0.0,
            cell_voltage_v=np.full(n_cells, np.nan),
            cell_temp_c=np.full(config.pack.n_temp_sensors, np.nan),
            current_a=math.nan,
            pack_voltage_v=math.nan,
            link_voltage_v=math.nan,
        )

    def run(self, t_s: float, dt_s: float, lagging: bool, stalled: bool = False) -> PackStatus:
        """Run the six stages once at time ``t_s`` (monotonic) with the measured ``dt_s``.

        ``lagging`` and ``stalled`` come from the rate keeper. Nothing raises out of here: a
        failing read or estimate becomes a fault; a failure of protection itself opens the
        contactors for good (``internal_error``, until restart).
        """
        conditions: dict[str, bool | None] = {
            "loop_lag": lagging,
            "loop_stalled": stalled,
            "latch_store_write_failed": self._latch_write_failed,
        }

        # 1. read (the two sources separately: a dead front-end must not hide a weld)
        try:
            m = self.frontend.read(t_s)
            conditions["frontend_error"] = False
            conditions.update(self._frontend_faults(m.frontend_faults))
        except Exception:
            self.errors.report("front-end read")
            conditions["frontend_error"] = True
            m = self._empty
        try:
            feedback = self.contactors.feedback(t_s)
        except Exception:
            self.errors.report("contactor feedback read")
            feedback = ContactorFeedback(ALL_OPEN, valid=False)
        conditions["contactor_feedback_invalid"] = not feedback.valid

        estimate = self.estimate
        try:
            # 2. validate
            stuck = self.stuck.update(m.cell_voltage_v, m.current_a, dt_s)
            # Valid feedback without the interlock bit, where the pack has a loop, counts as
            # open: a box that cannot report it must not pass for a closed loop.
            interlock_closed = feedback.interlock_closed
            if feedback.valid and interlock_closed is None:
                interlock_closed = False
            conditions.update(
                measurement_conditions(m, self.config.protection, stuck, interlock_closed)
            )
            conditions.update(
                graded_conditions(
                    m,
                    self.config.limits,
                    self.config.pack.n_parallel,
                    self.config.soc.rest_current_a,
                )
            )
            # 3. estimate
            estimate = self.estimate = self.estimator.step(
                m.current_a, m.cell_voltage_v, m.cell_temp_c, dt_s
            )
            conditions.update(estimator_conditions(estimate, self.config.protection))
            if self.charge_check is not None:
                conditions["current_soc_mismatch"] = self.charge_check.update(
                    m.current_a, estimate, dt_s
                )
        except Exception:
            self.errors.report("validate/estimate")
            conditions["internal_error"] = True
            estimate = self.estimator.unknown()  # never publish the last cycle's as this one's

        # 4. protect
        try:
            conditions.update(dict.fromkeys(self.fsm.faults, True))
            verdict = self.diagnosis.update(conditions, dt_s)
            out = self.fsm.step(
                t_s,
                close_requested=self.close_requested,
                open_now=verdict.open_now,
                no_close=verdict.no_close,
                feedback=feedback,
                pack_voltage_v=m.pack_voltage_v,
                link_voltage_v=m.link_voltage_v,
            )
            state, command = out.state, out.command
            active, latched = verdict.active, verdict.latched
            if state is not self._last_state:
                log.info("contactors: %s -> %s", self._last_state.value, state.value)
                self._last_state = state
            for fault_id in verdict.newly_latched:
                log.error("fault latched: %s (%s)", fault_id, FAULTS[fault_id].description)
            self._record_latches(verdict.newly_latched)
        except Exception:
            if not self.protection_failed:
                log.critical("fault latched: internal_error (protection itself failed)")
            self.errors.report("protect")
            self.protection_failed = True
        if self.protection_failed:
            state, command = ContactorState.FAULT, ALL_OPEN
            active = ("internal_error",)
            self._record_latches(("internal_error",))
            latched = tuple(self.latch_records)

        # Derating and balancing: only while no active fault forbids a close (nor a latch).
        forbidden = bool(latched) or any(FAULTS[f].action >= Action.NO_CLOSE for f in active)
        allowed = state is ContactorState.CLOSED and not forbidden
        try:
            charge_limit_a, discharge_limit_a = self.limiter.update(
                m.cell_voltage_v, m.cell_temp_c, estimate, allowed, dt_s
            )
        except Exception:
            self.errors.report("derating")
            charge_limit_a = discharge_limit_a = 0.0
        balancing = None
        if self.balancer is not None:
            try:
                may_bleed = self.balancer.allowed(
                    m.cell_voltage_v,
                    m.cell_temp_c,
                    m.current_a,
                    self.config.soc.rest_current_a,
                    forbidden,
                )
                balancing = self.balancer.update(
                    t_s, estimate.soc, m.cell_voltage_v, may_bleed, soc_std=estimate.soc_std
                )
            except Exception:
                self.errors.report("balancing decision")
                balancing = np.zeros(self.config.pack.n_cells, dtype=bool)
        status = PackStatus(
            t_s=t_s,
            contactors=state,
            estimate=estimate,
            measurement=m,
            active_faults=active,
            latched_faults=latched,
            charge_limit_a=charge_limit_a,
            discharge_limit_a=discharge_limit_a,
            balancing=balancing,
        )

        # 5. actuate (also the dead-man refresh of the contactor box)
        try:
            self.contactors.command(command)
        except Exception:
            self.errors.report("contactor command")  # the box's dead-man opens on its own
        if balancing is not None:
            try:
                self.frontend.balance(balancing)
            except Exception:
                self.errors.report("balancing command")  # the front-end stops on its own
        # Persist new latches now, after the contactors were commanded open: a latch is on
        # disk before the next cycle (a failed write is retried every second, and forbids a
        # close meanwhile).
        self._save_latches(t_s)
        # 6. publish
        if self.publisher is not None:
            try:
                self.publisher.publish(status)
            except Exception:
                self.errors.report("publish")
        return status

    def _frontend_faults(self, fault_ids: tuple[str, ...]) -> dict[str, bool]:
        """The faults a front-end reports itself; one the table does not know means the
        front-end and the table disagree, which is a front-end error (fail safe)."""
        unknown = [f for f in fault_ids if f not in FAULTS]
        if unknown:
            self.errors.report("front-end fault report", f"faults the table lacks: {unknown}")
        found = dict.fromkeys((f for f in fault_ids if f in FAULTS), True)
        return found | ({"frontend_error": True} if unknown else {})

    def _record_latches(self, fault_ids: tuple[str, ...]) -> None:
        for fault_id in fault_ids:
            if fault_id not in self.latch_records:
                spec = FAULTS.get(fault_id)
                self.latch_records[fault_id] = LatchRecord(
                    fault_id=fault_id,
                    latched_at_utc=utc_now_iso(),
                    description=spec.description if spec else fault_id,
                )
                self._latches_unsaved = True
                self._latch_tried_s = -math.inf  # write at once

    def _save_latches(self, t_s: float) -> None:
        if not self._latches_unsaved or self.latch_store is None:
            return
        if t_s - self._latch_tried_s < 1.0:
            return
        self._latch_tried_s = t_s
        try:
            self.latch_store.save(self.latch_records)
        except Exception:
            self.errors.report("writing the latched faults")
            self._latch_write_failed = True
            return
        self._latches_unsaved = False
        self._latch_write_failed = False

    def close(self) -> None:
        """A last attempt to write latches that could not be written yet."""
        self._save_latches(math.inf)

    def wait_for_first_sample(self, clock: Callable[[], float], timeout_s: float) -> bool:
        """Before the first cycle: wait until every front-end group and the contactor
        feedback have been heard, so a BMS that boots before its front-end does not latch
        a timeout. The contactors are held open meanwhile. False on timeout."""

        def heard_everything(now_s: float) -> bool:
            sample = self.frontend.read(now_s)
            return not sample.stale_groups and self.contactors.feedback(now_s).valid

        return self._hold_open_until(heard_everything, clock, timeout_s)

    def open_and_wait(self, clock: Callable[[], float], timeout_s: float) -> bool:
        """Command everything open and wait until the feedback confirms it (on shutdown).
        False when the feedback does not show every relay open in time."""

        def confirmed_open(now_s: float) -> bool:
            feedback = self.contactors.feedback(now_s)
            return feedback.valid and not feedback.relays.any_closed

        return self._hold_open_until(confirmed_open, clock, timeout_s)

    def _hold_open_until(
        self, done: Callable[[float], bool], clock: Callable[[], float], timeout_s: float
    ) -> bool:
        """Command every relay open (refreshing the dead-man) until ``done(now_s)`` or timeout."""
        deadline_s = clock() + timeout_s
        while True:
            now_s = clock()
            try:
                self.contactors.command(ALL_OPEN)
                if done(now_s):
                    return True
            except Exception:
                self.errors.report("holding the contactors open")
            if now_s >= deadline_s:
                return False
            time.sleep(min(0.01, self.config.loop.period_s))
