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
import queue
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from bms.backends import ContactorDriver, FrontEnd, Publisher
from bms.config import BmsConfig
from bms.estimation.cell_params import CellParams
from bms.estimation.estimator import Estimate, PackEstimator
from bms.health.service import HealthService
from bms.protection.balancing import Balancer, bleed_current_a
from bms.protection.contactors import FAULT_IDS as CONTACTOR_FAULT_IDS
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
from bms.report import sample_record
from bms.store.latches import LatchKeeper, LatchStore
from bms.store.recorder import PackRecorder
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


def _charge_check_settings(config: BmsConfig) -> tuple:
    p = config.protection
    return (p.charge_check_window_s, p.charge_check_tolerance_a)


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
        recorder: PackRecorder | None = None,
        health: HealthService | None = None,
    ):
        """``latch_store``: where latched faults persist; those found there at start hold the
        contactors open from the first cycle. None keeps latches in memory only (tests).
        ``recorder``: the state store (SOC, throughput, fault log); None: not persisted.
        ``health``: the state-of-health service beside the loop, fed every cycle; or None."""
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
        self.charge_check = self._charge_check(config)
        self.recorder = recorder
        self.health = health
        self.latches = LatchKeeper(latch_store, recorder)
        if recorder is not None:
            restored = recorder.restored_soc(n_cells, config.soc.rest_time_s)
            if restored is not None:
                self.estimator.set_soc(*restored)
        self.diagnosis = Diagnosis(config.diagnosis, latched=self.latches.records)
        self.requests: queue.SimpleQueue[tuple[list[str] | None, str, Future]] = queue.SimpleQueue()
        self.last_cycle_healthy = False
        self.sample_complete = False
        self._feedback = ContactorFeedback(ALL_OPEN, valid=False)
        self.limiter = CurrentLimiter(config.limits, config.derating, config.pack.n_parallel)
        self.balancer = self._balancer(config)
        self._bleeding = np.zeros(n_cells, dtype=bool)
        """The cells the front-end was last told to bleed: they bleed until the next cycle."""
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
        self._measurement = self._empty

    def run(self, t_s: float, dt_s: float, lagging: bool, stalled: bool = False) -> PackStatus:
        """Run the six stages once at time ``t_s`` (monotonic) with the measured ``dt_s``.

        ``lagging`` and ``stalled`` come from the rate keeper. Nothing raises out of here: a
        failing read or estimate becomes a fault; a failure of protection itself opens the
        contactors for good (``internal_error``, until restart).
        """
        self._serve_requests()
        conditions: dict[str, bool | None] = {
            "loop_lag": lagging,
            "loop_stalled": stalled,
            "latch_store_write_failed": self.latches.write_failed,
        }
        if self.recorder is not None:
            conditions["store_write_failed"] = self.recorder.failed

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
        self._feedback = feedback
        self._measurement = m
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
                m.current_a,
                m.cell_voltage_v,
                m.cell_temp_c,
                dt_s,
                bleed_current_a(
                    self._bleeding, m.cell_voltage_v, self.config.balancing.bleed_resistance_ohm
                ),
            )
            conditions.update(estimator_conditions(estimate, self.config.protection))
            if self.charge_check is not None:
                conditions["current_soc_mismatch"] = self.charge_check.update(
                    m.current_a, estimate, dt_s
                )
            if self.health is not None:
                self.health.offer(
                    t_s,
                    m.current_a,
                    m.cell_voltage_v,
                    self.estimator.temp_c,
                    estimate.soc,
                    estimate.soc_std,
                )
                latest = self.health.latest
                conditions["soh_disagreement"] = bool(latest is not None and latest.disagree.any())
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
                log.error(
                    "fault latched: %s (%s)",
                    fault_id,
                    FAULTS[fault_id].description,
                    extra={"fault_id": fault_id},
                )
            self._record_latches(verdict.newly_latched, m, estimate, active)
        except Exception:
            if not self.protection_failed:
                log.critical("fault latched: internal_error (protection itself failed)")
            self.errors.report("protect")
            self.protection_failed = True
        if self.protection_failed:
            state, command = ContactorState.FAULT, ALL_OPEN
            active = ("internal_error",)
            self._record_latches(("internal_error",), m, estimate, active)
            latched = tuple(self.latches.records)

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
            health=self.health.latest if self.health is not None else None,
        )

        # 5. actuate (also the dead-man refresh of the contactor box)
        commanded = False
        try:
            self.contactors.command(command)
            commanded = True
        except Exception:
            self.errors.report("contactor command")  # the box's dead-man opens on its own
        if balancing is not None:
            try:
                self.frontend.balance(balancing)
                self._bleeding = balancing
            except Exception:
                self._bleeding = np.zeros_like(self._bleeding)  # it stops on its own
                self.errors.report("balancing command")
        if self.recorder is not None:
            try:
                health = status.health
                soh = health.soh if health is not None else np.full(m.cell_voltage_v.size, np.nan)
                self.recorder.on_cycle(t_s, dt_s, m, estimate, soh)
            except Exception:
                self.errors.report("recording the state")
        # 6. publish
        if self.publisher is not None:
            try:
                self.publisher.publish(status)
            except Exception:
                self.errors.report("publish")
        self.sample_complete = not m.stale_groups and feedback.valid and m is not self._empty
        # Healthy for systemd's watchdog: protection ran and the contactors were commanded, on
        # time. A failing peripheral (front-end, publisher) is a diagnosis condition instead:
        # restarting the service would not mend it, only open the contactors again and again.
        self.last_cycle_healthy = not self.protection_failed and not stalled and commanded
        return status

    def _frontend_faults(self, fault_ids: tuple[str, ...]) -> dict[str, bool]:
        """The faults a front-end reports itself; one the table does not know means the
        front-end and the table disagree, which is a front-end error (fail safe)."""
        unknown = [f for f in fault_ids if f not in FAULTS]
        if unknown:
            self.errors.report("front-end fault report", f"faults the table lacks: {unknown}")
        found = dict.fromkeys((f for f in fault_ids if f in FAULTS), True)
        return found | ({"frontend_error": True} if unknown else {})

    RESTART_SECTIONS = (
        "pack",
        "loop",
        "can",
        "soc",
        "service",
        "store",
        "frontend",
        "contactors",
        "publisher",
        "sim",
    )
    """What a reload cannot change under a running loop: the pack's shape, its buses and
    backends, the rate, the persistence. The rest (limits, protection, diagnosis, derating,
    balancing, control) takes effect between two cycles."""

    def _charge_check(self, config: BmsConfig) -> ChargeCrossCheck | None:
        protection = config.protection
        if protection.charge_check_tolerance_a is None:
            return None
        return ChargeCrossCheck(
            protection.charge_check_window_s,
            self.estimator.cell.capacity_ah * config.pack.n_parallel,
            protection.charge_check_tolerance_a,
        )

    def _balancer(self, config: BmsConfig) -> Balancer | None:
        if not config.balancing.enabled:
            return None
        if not self.frontend.supports_balancing:
            log.warning(
                "[balancing] is enabled but the %s front-end cannot balance",
                config.frontend.name,
            )
            return None
        capacity_ah = self.estimator.cell.capacity_ah * config.pack.n_parallel
        balancer = Balancer(config.balancing, config.pack.n_cells, capacity_ah)
        if getattr(self, "balancer", None) is not None:
            balancer.selected = self.balancer.selected  # the hysteresis carries on
        return balancer

    def reconfigure(self, new: BmsConfig) -> list[str]:
        """Apply a reloaded config between cycles. Returns what changed but needs a restart;
        then nothing is applied (all or nothing), so the loop runs on the old."""
        old = self.config
        restart = [f"[{s}]" for s in self.RESTART_SECTIONS if getattr(old, s) != getattr(new, s)]
        if old.protection.latch_file != new.protection.latch_file:
            restart.append("[protection] latch_file")
        if restart:
            return restart
        # Build everything first, then swap, so a failure leaves the old config whole.
        protection = new.protection
        window_v = (
            max(new.limits.cell_voltage_low_v.mol, self.estimator.cell.voltage_min_v),
            min(new.limits.cell_voltage_high_v.mol, self.estimator.cell.voltage_max_v),
        )
        charge_check = self.charge_check
        if _charge_check_settings(old) != _charge_check_settings(new):
            charge_check = self._charge_check(new)
        limiter = CurrentLimiter(new.limits, new.derating, new.pack.n_parallel)
        limiter.charge_limit_a = self.limiter.charge_limit_a  # the ramp carries on
        limiter.discharge_limit_a = self.limiter.discharge_limit_a
        balancer = self._balancer(new)
        self.diagnosis.reconfigure(new.diagnosis)
        self.config = new
        self.estimator.power_voltage_min_v, self.estimator.power_voltage_max_v = window_v
        self.stuck.stuck_time_s = protection.stuck_time_s
        self.stuck.min_current_a = protection.stuck_min_current_a
        self.charge_check = charge_check
        self.limiter = limiter
        if self.balancer is not None and balancer is None:
            self._bleeding = np.zeros(new.pack.n_cells, dtype=bool)
            try:  # switched off: stop bleeding now, not when the front-end times out
                self.frontend.balance(self._bleeding)
            except Exception:
                self.errors.report("balancing command")
        self.balancer = balancer
        self.fsm.reconfigure(new.control)
        self.close_requested = new.control.close_on_start
        return []

    def _record_latches(
        self, fault_ids: tuple[str, ...], m: Measurement, estimate: Estimate, active
    ) -> None:
        for fault_id in fault_ids:
            spec = FAULTS.get(fault_id)
            description = spec.description if spec else fault_id
            self.latches.latch(fault_id, description, sample_record(m, estimate, active))

    def _serve_requests(self) -> None:
        """Answer the clear requests the control socket handed over since the last cycle."""
        while True:
            try:
                fault_ids, who, reply = self.requests.get_nowait()
            except queue.Empty:
                return
            if not reply.set_running_or_notify_cancel():
                continue  # the asker gave up waiting
            try:
                reply.set_result(self.clear_latched(fault_ids, who))
            except Exception as exc:
                self.errors.report("clearing latched faults")
                reply.set_exception(exc)

    def clear_latched(self, fault_ids: list[str] | None, who: str) -> dict:
        """Clear latched faults (all when None) whose cause is gone; refuse the others, with
        the reason. Runs in the loop's thread, between two cycles."""
        ids = list(self.latches.records) if fault_ids is None else list(fault_ids)
        cleared, refused = [], {}
        for fault_id in ids:
            reason = self._why_not_clear(fault_id)
            if reason is not None:
                refused[fault_id] = reason
                continue
            self.diagnosis.clear(fault_id)
            self.fsm.clear(fault_id)
            self.latches.clear(fault_id, who)
            cleared.append(fault_id)
        if cleared:
            log.warning("latched faults cleared by %s: %s", who, ", ".join(cleared))
        return {"ok": not refused, "cleared": cleared, "refused": refused}

    def _why_not_clear(self, fault_id: str) -> str | None:
        if fault_id not in self.latches.records:
            return "not latched"
        if fault_id == "internal_error" and self.protection_failed:
            return "protection itself failed in this run: restart the service"
        if fault_id in CONTACTOR_FAULT_IDS:  # found by the state machine, now or before a restart
            m = self._measurement
            return self.fsm.cause_gone(fault_id, self._feedback, m.pack_voltage_v, m.link_voltage_v)
        if self.diagnosis.cause_present(fault_id):
            return "its cause is still present (or was in the last cycles)"
        return None

    def close(self) -> None:
        """Write the latches still pending (the latch file's writer thread stops)."""
        self.latches.close()

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
