"""Boundaries and exact timings of protection, each test written to kill a mutant that the
rest of the suite let survive (mutmut over bms/protection; see the issue's closing note)."""

from __future__ import annotations

import math

import numpy as np

from bms.config import ControlConfig, ProtectionConfig, load_limit_set
from bms.protection.contactors import ContactorStateMachine, _balanced
from bms.protection.derating import (
    CurrentLimiter,
    DeratingConfig,
    charge_factors,
    discharge_factors,
)
from bms.protection.diagnosis import Diagnosis, DiagnosisConfig
from bms.protection.plausibility import StuckDetector, graded_conditions, measurement_conditions
from bms.types import ALL_OPEN, ContactorFeedback, ContactorState, Measurement, RelayStates
from tests.conftest import LIMITS as LIMIT_FILE
from tests.fakes import estimate_of

LIMITS = load_limit_set(LIMIT_FILE)
DCFG = DeratingConfig()
PROT = ProtectionConfig(
    limits=LIMIT_FILE,
    latch_file="unused.json",
    short_circuit_current_a=100.0,
    pack_voltage_tolerance_v=0.5,
)


def meas(v=(3.5, 3.5, 3.5, 3.5), t=(25.0, 25.0), i=-5.0, pack=14.0):
    return Measurement(1.0, np.array(v, float), np.array(t, float), i, pack, pack)


# ---------- derating
def test_nan_soc_gives_zero_soc_factor():
    v, t = np.array([3.7]), np.array([25.0])
    assert charge_factors(v, t, np.array([math.nan]), LIMITS, DCFG)["soc"] == 0.0


def test_single_cell_arrays_give_real_factors():
    v, t, s = np.array([3.7]), np.array([25.0]), np.array([0.5])
    healthy = {
        "temp_high": 1.0,
        "temp_low": 1.0,
        "cell_voltage": 1.0,
        "soc": 1.0,
        "temp_spread": 1.0,
        "cell_voltage_spread": 1.0,
    }
    assert charge_factors(v, t, s, LIMITS, DCFG) == healthy
    assert discharge_factors(v, t, s, LIMITS, DCFG) == healthy


def test_limiter_ramps_from_zero():
    lim = CurrentLimiter(LIMITS, DCFG, 1)
    v, t, s = np.array([3.7, 3.7]), np.array([25.0]), np.array([0.5, 0.5])
    assert lim.update(v, t, estimate_of(s), True, 0.125) == (1.25, 1.25)


# ---------- plausibility
def test_stuck_counts_again_after_a_rest_cycle():
    d = StuckDetector(1, stuck_time_s=0.5, min_current_a=1.0)
    x = np.array([3.7])
    d.update(x, 0.0, 0.25)  # rest: reset
    out = [bool(d.update(x, 5.0, 0.25)[0]) for _ in range(3)]
    assert out == [False, True, True]


def test_stuck_counts_at_exactly_min_current_and_exactly_stuck_time():
    d = StuckDetector(1, stuck_time_s=0.5, min_current_a=1.0)
    x = np.array([3.7])
    out = [bool(d.update(x, 1.0, 0.25)[0]) for _ in range(3)]
    assert out == [False, False, True]


def test_graded_clean_is_false_not_none():
    c = graded_conditions(meas(), LIMITS, 1, 0.5)
    assert all(v is False for v in c.values()), {k: v for k, v in c.items() if v is not False}


def test_graded_values_at_limit_are_not_beyond():
    # exactly at MOL: not beyond
    c = graded_conditions(meas(v=(4.15, 3.0, 3.5, 3.5)), LIMITS, 1, 0.5)
    assert c["cell_voltage_high_mol"] is False and c["cell_voltage_low_mol"] is False


def test_spread_exactly_at_limit_is_not_beyond():
    c = graded_conditions(meas(t=(20.0, 25.0)), LIMITS, 1, 0.5)
    assert c["temp_spread_mol"] is False


def test_current_exactly_rest_is_rest_not_charge():
    # 47 C: above charge MOL (45), below discharge MOL (55); current == rest -> discharge rules
    c = graded_conditions(meas(t=(47.0, 47.0), i=0.5), LIMITS, 1, 0.5)
    assert c["temp_high_charge_mol"] is False


def test_current_exactly_at_limit_is_not_beyond():
    c = graded_conditions(meas(i=10.0), LIMITS, 1, 0.5)
    assert c["charge_current_mol"] is False
    c = graded_conditions(meas(i=-20.0), LIMITS, 1, 0.5)
    assert c["discharge_current_mol"] is False


def test_pack_mismatch_exactly_at_tolerance_is_not_beyond():
    c = measurement_conditions(meas(pack=14.5), PROT, np.zeros(4, bool))
    assert c["pack_voltage_mismatch"] is False


def test_short_circuit_exactly_at_limit_is_not_beyond():
    c = measurement_conditions(meas(i=-100.0), PROT, np.zeros(4, bool))
    assert c["short_circuit"] is False


# ---------- diagnosis
def test_disabled_row_never_activates():
    cfg = DiagnosisConfig(rows={"cell_voltage_high_mol": {"enabled": False}})
    d = Diagnosis(cfg)
    for _ in range(10):
        v = d.update({}, 0.1)
        assert "cell_voltage_high_mol" not in v.active
    for _ in range(10):
        v = d.update({"cell_voltage_high_mol": True}, 0.1)
    assert "cell_voltage_high_mol" not in v.active


def test_row_open_delay_override_is_used():
    cfg = DiagnosisConfig(
        debounce_cycles=1, open_delay_s=0.5, rows={"cell_voltage_high_msl": {"open_delay_s": 1.0}}
    )
    d = Diagnosis(cfg)
    latched_at = None
    for n in range(20):
        v = d.update({"cell_voltage_high_msl": True}, 0.125)
        if v.latched and latched_at is None:
            latched_at = n
    assert latched_at == 8  # active at n=0, 1.0 s later


def test_left_out_id_counts_as_absent():
    d = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    for _ in range(3):
        d.update({"cell_voltage_high_mol": True}, 0.1)
    for _ in range(6):
        v = d.update({}, 0.1)
    assert v.active == ()


def test_rsl_condition_forbids_close_before_debounce():
    d = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    v = d.update({"cell_voltage_high_rsl": True}, 0.1)
    assert v.no_close is True and v.latched == ()


# ---------- contactors
CFG = ControlConfig(
    close_on_start=True, precharge_ratio=0.9375, precharge_timeout_s=1.0, relay_settle_s=0.25
)
DT = 0.125
PACK = 64.0


def fb(r, valid=True):
    return ContactorFeedback(r, valid)


def test_weld_in_open_goes_to_fault_with_all_open():
    fsm = ContactorStateMachine(CFG)
    closed = fb(RelayStates(True, False, True))
    fsm.step(0.0, False, False, False, closed, PACK, PACK)
    out = fsm.step(0.25, False, False, False, closed, PACK, PACK)  # exactly settle
    assert out.state is ContactorState.FAULT and out.command == ALL_OPEN
    assert out.faults == frozenset({"contactor_weld"})
    out = fsm.step(0.375, False, False, False, closed, PACK, PACK)  # and held in FAULT
    assert out.state is ContactorState.FAULT and out.command == ALL_OPEN


def test_open_now_in_open_goes_to_fault():
    fsm = ContactorStateMachine(CFG)
    out = fsm.step(0.0, True, True, False, fb(ALL_OPEN), PACK, 0.0)
    assert out.state is ContactorState.FAULT
    # held there while latched, its time counted from that step (the weld check uses it)
    out = fsm.step(DT, True, True, False, fb(RelayStates(positive=True)), PACK, 0.0)
    assert out.state is ContactorState.FAULT and out.faults == {"contactor_weld"}


class Box:
    def __init__(self, link_tau_cycles=None, stuck_open=False, welded=False, obey_precharge=True):
        self.relays = ALL_OPEN
        self.link = 0.0
        self.stuck_open = stuck_open
        self.welded = welded
        self.obey_precharge = obey_precharge
        self.tau = link_tau_cycles

    def obey(self, c):
        pos = (c.positive and not self.stuck_open) or (self.welded and self.relays.positive)
        pre = c.precharge if self.obey_precharge else (c.precharge or self.relays.precharge)
        self.relays = RelayStates(c.negative, pre, pos)
        if self.relays.negative and self.relays.positive:
            self.link = PACK
        elif self.relays.negative and self.relays.precharge:
            self.link = PACK if self.tau is None else self.link
        else:
            self.link = 0.0


def drive(fsm, box, ts, close=True, open_now=False, no_close=False):
    log = []
    for t in ts:
        out = fsm.step(t, close, open_now, no_close, fb(box.relays), PACK, box.link)
        log.append((t, out.state, out.command, out.faults))
        box.obey(out.command)
    return log


def times(n, t0=0.0):
    return [t0 + k * DT for k in range(n)]


def test_state_sequence_of_a_close():
    fsm, box = ContactorStateMachine(CFG), Box()
    log = drive(fsm, box, times(10))
    states = [(s, c) for _, s, c, _ in log]
    assert states[:5] == [
        (ContactorState.PRECHARGE, RelayStates(True, True, False)),
        (ContactorState.PRECHARGE, RelayStates(True, True, True)),
        (ContactorState.PRECHARGE, RelayStates(True, False, True)),
        (ContactorState.CLOSED, RelayStates(True, False, True)),
        (ContactorState.CLOSED, RelayStates(True, False, True)),
    ]


def test_precharge_timeout_at_exactly_timeout():
    fsm, box = ContactorStateMachine(CFG), Box(link_tau_cycles=1)  # link never charges
    log = drive(fsm, box, times(12))
    # entered PRECHARGE at t=0; timeout 1.0 s -> fails at t=1.0 exactly
    first = next(t for t, _, _, f in log if "precharge_failed" in f)
    assert first == 1.0


def test_precharge_relay_not_opening_is_mismatch_exactly_at_settle():
    fsm, box = ContactorStateMachine(CFG), Box(obey_precharge=False)
    log = drive(fsm, box, times(12))
    # t=0 PRECHARGING, t=.125 BRIDGING, t=.25 CLOSED cmd (enter OPEN_PRECHARGE at .25);
    # feedback never follows -> mismatch at .25 + .25 = .5 exactly
    first = next(t for t, _, _, f in log if "contactor_feedback_mismatch" in f)
    assert first == 0.5


def test_positive_not_closing_is_mismatch_exactly_at_settle():
    fsm, box = ContactorStateMachine(CFG), Box(stuck_open=True)
    log = drive(fsm, box, times(12))
    # BRIDGING entered at .125 -> mismatch at .375
    first = next(t for t, _, _, f in log if "contactor_feedback_mismatch" in f)
    assert first == 0.375


def test_precharge_relays_not_closing_is_mismatch_exactly_at_settle():
    fsm = ContactorStateMachine(CFG)
    log = []
    for t in times(6):
        out = fsm.step(t, True, False, False, fb(ALL_OPEN), PACK, 0.0)
        log.append((t, out.faults))
    first = next(t for t, f in log if "contactor_feedback_mismatch" in f)
    assert first == 0.25


def _closed_fsm():
    fsm, box = ContactorStateMachine(CFG), Box()
    drive(fsm, box, times(5))
    assert fsm.state is ContactorState.CLOSED
    return fsm, box


def test_weld_found_exactly_at_settle_when_opening_from_closed():
    fsm, box = _closed_fsm()
    box.welded = True
    log = drive(fsm, box, times(5, t0=1.0), close=False)
    assert log[0][1] is ContactorState.OPENING
    first = next(t for t, s, _, _ in log if s is ContactorState.FAULT)
    assert first == 1.25
    assert log[2][3] == frozenset({"contactor_weld"})


def test_weld_found_exactly_at_settle_when_open_now_from_closed():
    fsm, box = _closed_fsm()
    box.welded = True
    log = drive(fsm, box, times(5, t0=1.0), open_now=True)
    first = next(t for t, s, _, _ in log if s is ContactorState.FAULT)
    assert first == 1.25


def test_self_opening_in_closed_goes_to_opening():
    fsm, box = _closed_fsm()
    box.relays = RelayStates(True, False, False)
    out = fsm.step(1.0, True, False, False, fb(box.relays), PACK, PACK)
    assert out.state is ContactorState.OPENING


def test_mismatch_in_closed_then_weld_at_exactly_settle():
    fsm, box = _closed_fsm()
    box.relays = RelayStates(False, False, True)  # negative dropped: mismatch
    box.welded = True
    log = drive(fsm, box, times(5, t0=1.0))
    first = next(t for t, s, _, _ in log if s is ContactorState.FAULT)
    assert first == 1.25


def test_weld_found_exactly_at_settle_when_aborting_precharge():
    fsm = ContactorStateMachine(CFG)
    pre = fb(RelayStates(True, True, False))
    fsm.step(0.0, True, False, False, fb(ALL_OPEN), PACK, 0.0)  # -> PRECHARGE
    fsm.step(0.125, True, False, True, pre, PACK, 0.0)  # no_close -> OPENING at .125
    out = fsm.step(0.25, True, False, True, pre, PACK, 0.0)
    assert out.state is ContactorState.OPENING
    out = fsm.step(0.375, True, False, True, pre, PACK, 0.0)
    assert out.state is ContactorState.FAULT


def test_weld_found_exactly_at_settle_after_precharge_failed():
    fsm = ContactorStateMachine(CFG)
    pre = fb(RelayStates(True, True, False))
    fsm.step(0.0, True, False, False, fb(ALL_OPEN), PACK, 0.0)
    for t in times(7, t0=0.125):
        fsm.step(t, True, False, False, pre, PACK, 0.0)
    out = fsm.step(1.0, True, False, False, pre, PACK, 0.0)  # precharge_failed -> OPENING at 1.0
    assert out.state is ContactorState.OPENING
    out = fsm.step(1.125, True, False, False, pre, PACK, 0.0)
    assert out.state is ContactorState.OPENING
    out = fsm.step(1.25, True, False, False, pre, PACK, 0.0)
    assert out.state is ContactorState.FAULT


def test_weld_found_exactly_at_settle_after_mismatch_in_precharge():
    fsm = ContactorStateMachine(CFG)
    fsm.step(0.0, True, False, False, fb(ALL_OPEN), PACK, 0.0)
    fsm.step(0.125, True, False, False, fb(ALL_OPEN), PACK, 0.0)
    out = fsm.step(0.25, True, False, False, fb(ALL_OPEN), PACK, 0.0)  # mismatch -> OPENING
    assert out.state is ContactorState.OPENING
    stuck = fb(RelayStates(True, False, False))
    out = fsm.step(0.375, True, False, False, stuck, PACK, 0.0)
    assert out.state is ContactorState.OPENING
    out = fsm.step(0.5, True, False, False, stuck, PACK, 0.0)
    assert out.state is ContactorState.FAULT
    assert "contactor_weld" in out.faults


def test_opening_weld_fault_set_is_exact():
    fsm, box = _closed_fsm()
    box.welded = True
    log = drive(fsm, box, times(3, t0=1.0), close=False)
    assert log[-1][1] is ContactorState.FAULT
    assert log[-1][3] == frozenset({"contactor_weld"})


def test_weld_after_fault_is_reported():
    fsm = ContactorStateMachine(CFG)
    fsm.step(0.0, True, True, False, fb(ALL_OPEN), PACK, 0.0)  # open_now -> FAULT
    out = fsm.step(0.125, True, True, False, fb(RelayStates(False, False, True)), PACK, 0.0)
    assert out.faults == frozenset({"contactor_weld"})


def test_weld_in_open_after_a_clean_open_at_exactly_settle():
    fsm, box = _closed_fsm()
    log = drive(fsm, box, times(2, t0=1.0), close=False)  # OPENING at 1.0, OPEN at 1.125
    assert log[-1][1] is ContactorState.OPEN
    closed = fb(RelayStates(True, False, False))
    out = fsm.step(1.25, False, False, False, closed, PACK, 0.0)
    assert out.faults == frozenset()
    out = fsm.step(1.375, False, False, False, closed, PACK, 0.0)
    assert out.faults == frozenset({"contactor_weld"})


def test_balanced_edges():
    assert _balanced(0.0, 0.0, 0.95) is False
    assert _balanced(0.98, 1.0, 0.95) is True
    assert _balanced(45.0, 60.0, 0.75) is True


def test_insulation_and_interlock_that_cannot_be_read_are_unknown_not_clean():
    with_both = PROT.model_copy(
        update={"insulation_warning_kohm": 35.0, "insulation_error_kohm": 7.0, "interlock": True}
    )
    m = meas()
    m.insulation_kohm = math.nan
    c = measurement_conditions(m, with_both, np.zeros(4, bool), interlock_closed=None)
    assert c["insulation_invalid"] is True
    assert c["insulation_warning"] is None and c["insulation_error"] is None
    assert c["interlock_open"] is None
    m.insulation_kohm = 35.0  # exactly at the warning threshold: not below it
    c = measurement_conditions(m, with_both, np.zeros(4, bool), interlock_closed=True)
    assert c["insulation_warning"] is False and c["interlock_open"] is False
    m.insulation_kohm = 7.0
    c = measurement_conditions(m, with_both, np.zeros(4, bool), interlock_closed=False)
    assert c["insulation_warning"] is True and c["insulation_error"] is False
    assert c["interlock_open"] is True


def test_packs_without_monitor_or_loop_have_no_such_conditions():
    c = measurement_conditions(meas(), PROT, np.zeros(4, bool), interlock_closed=False)
    assert not {"insulation_invalid", "insulation_warning", "interlock_open"} & set(c)


# ---------- the checks added with the service work: exact boundaries (times in 1/8 s)
CHECKS = CFG.model_copy(update={"precharge_min_s": 0.5, "link_decay_s": 1.0})


class LinkBox(Box):
    """Box whose link charges at ``rate`` of the pack voltage per cycle while precharging and
    stays where it is after an opening (``held``) or falls to ``rest_v``."""

    def __init__(self, rate=1.0, held=False, rest_v=0.0, start_v=0.0):
        super().__init__()
        self.rate, self.held, self.rest_v, self.link = rate, held, rest_v, start_v

    def obey(self, c):
        self.relays = RelayStates(c.negative, c.precharge, c.positive)
        if c.negative and c.positive:
            self.link = PACK
        elif c.negative and c.precharge:
            self.link = min(PACK, self.link + self.rate * PACK)
        elif not self.held:
            self.link = self.rest_v


def precharge_takes(cycles_to_charge: int) -> set[str]:
    """Faults of a close whose link reaches the ratio after that many cycles (1/8 s each)."""
    fsm, box = ContactorStateMachine(CHECKS), LinkBox(rate=1.0 / cycles_to_charge)
    return drive(fsm, box, times(20))[-1][3]


def test_a_precharge_of_exactly_precharge_min_s_is_not_too_fast():
    # the link is seen charged n cycles (of 1/8 s) after the precharge began
    assert precharge_takes(4) == frozenset()  # 0.5 s: exactly precharge_min_s, not too fast
    assert precharge_takes(3) == {"precharge_too_fast"}  # 0.375 s


def test_the_link_check_falls_exactly_at_link_decay_s_and_exactly_at_its_ratio():
    def faults_after_opening(held_v: float, cycles: int) -> frozenset[str]:
        fsm, box = ContactorStateMachine(CHECKS), LinkBox(rate=0.25)  # charged in 0.5 s
        log = drive(fsm, box, times(10))
        assert log[-1][1] is ContactorState.CLOSED
        box.held, box.rest_v = False, held_v
        return drive(fsm, box, times(cycles, t0=10 * DT), close=False)[-1][3]

    # opened in the cycle at 1.25 s, confirmed open at 1.375 s; judged 1 s later, at 2.375 s
    assert faults_after_opening(0.5 * PACK + 1.0, 9) == frozenset()  # 2.25 s: not yet
    assert faults_after_opening(0.5 * PACK + 1.0, 10) == {"link_voltage_held"}
    assert faults_after_opening(0.5 * PACK, 12) == frozenset()  # exactly at the ratio: fallen
    assert faults_after_opening(0.3 * PACK, 12) == frozenset()  # a ratio of the pack voltage


def test_a_link_at_exactly_the_charged_share_is_judged_by_speed():
    from bms.protection.contactors import CHARGED_LINK_RATIO

    fsm, box = ContactorStateMachine(CHECKS), LinkBox(rate=1.0, start_v=CHARGED_LINK_RATIO * PACK)
    box.rest_v = CHARGED_LINK_RATIO * PACK  # it stays there until the precharge starts
    assert drive(fsm, box, times(20))[-1][3] == {"precharge_too_fast"}


def test_the_reasons_a_contactor_fault_stays_latched_are_stated_exactly():
    fsm = ContactorStateMachine(CHECKS)
    closed = ContactorFeedback(RelayStates(positive=True), valid=True)
    assert fsm.cause_gone("contactor_weld", closed, PACK, 0.0) == (
        "the contactor feedback does not show every relay open"
    )
    assert fsm.cause_gone("link_voltage_held", fb(ALL_OPEN), PACK, PACK) == (
        "the DC link is still charged (or its voltage is unknown)"
    )


def test_a_latch_restored_at_start_stays_active_while_its_counter_drains():
    d = Diagnosis(DiagnosisConfig(debounce_cycles=3), latched=["cell_voltage_high_msl"])
    for _ in range(5):  # 3 - 5 x 0.5 = 0.5 left
        verdict = d.update({"cell_voltage_high_msl": False}, 0.1)
        assert "cell_voltage_high_msl" in verdict.active
    assert d.cause_present("cell_voltage_high_msl")  # 0.5 left of the counter
    assert "cell_voltage_high_msl" not in d.update({"cell_voltage_high_msl": False}, 0.1).active


def test_a_cause_seen_once_below_its_debounce_is_present_for_a_clear():
    d = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=0.0))
    for _ in range(3):
        d.update({"cell_voltage_high_msl": True}, 0.1)
    for _ in range(6):
        d.update({"cell_voltage_high_msl": False}, 0.1)
    assert not d.cause_present("cell_voltage_high_msl")
    verdict = d.update({"cell_voltage_high_msl": True}, 0.1)  # once: counter 1 of 3
    assert "cell_voltage_high_msl" not in verdict.active
    assert d.cause_present("cell_voltage_high_msl")


def test_clearing_a_fault_that_is_not_latched_changes_nothing():
    d = Diagnosis(DiagnosisConfig())
    d.clear("short_circuit")
    assert d.update({}, 0.1).latched == ()


def test_charge_check_boundaries():
    from bms.protection.plausibility import ChargeCrossCheck

    check = ChargeCrossCheck(window_s=100.0, capacity_ah=1.0, tolerance_a=0.5)
    assert math.isnan(check.apparent_error_a)
    # an estimate exactly at the sigma limit is sure; half-second steps count as half
    verdicts = []
    soc = 0.25
    for k in range(401):
        soc = 0.25 + 0.125 * max(0, k - 200) / 200  # window 2 (steps 200..400): +0.125
        verdicts.append(check.update(4.0, estimate_of([soc] * 2, soc_std=0.05), 0.5))
    # window 2: implied 0.125 x 3600 As = 450 As, counted 4 A x 100 s = 400 As: 0.5 A exactly
    assert check.apparent_error_a == 0.5
    assert verdicts[-1] is False  # at the tolerance: not beyond it
    assert verdicts[300] is None  # the first window only settles: no verdict, not ""
    # after an unsure estimate the next window settles again, and says nothing meanwhile
    assert check.update(4.0, estimate_of([soc] * 2, soc_std=0.2), 0.5) is None
    assert check.update(4.0, estimate_of([soc] * 2, soc_std=0.05), 0.5) is None
    assert check.update(4.0, estimate_of([soc] * 2, soc_std=0.05), 0.5) is None


def test_graded_discharge_temperature_rows_are_clean_not_unknown_while_discharging():
    m = meas(t=(60.0, 25.0), i=-5.0)  # above the charge MSL (55), below discharge MSL (65)
    conditions = graded_conditions(m, LIMITS, 1, 0.5)
    assert conditions["temp_high_discharge_msl"] is False
    assert conditions["temp_high_charge_msl"] is False
    cold = graded_conditions(meas(t=(-5.0, 25.0), i=-5.0), LIMITS, 1, 0.5)
    assert cold["temp_low_discharge_msl"] is False and cold["temp_low_charge_msl"] is False


def test_redundant_current_exactly_at_the_tolerance_is_not_a_mismatch():
    prot = PROT.model_copy(
        update={"redundant_current_tolerance_a": 1.0, "redundant_current_tolerance_fraction": 0.25}
    )
    m = Measurement(1.0, np.full(4, 3.5), np.full(2, 25.0), -4.0, 14.0, 14.0)
    m.redundant_current_a = -6.0  # 1 A + 25 % of 4 A = 2 A apart: exactly the band
    assert measurement_conditions(m, prot, np.zeros(4, bool))["current_mismatch"] is False
    m.redundant_current_a = -6.0625
    assert measurement_conditions(m, prot, np.zeros(4, bool))["current_mismatch"] is True


def test_graded_quantities_are_read_off_the_limit_set_fields():
    """Computed once at import (so mutation testing only reaches them through a call)."""
    from bms.protection.limits import LimitSet, _graded_quantities

    quantities = _graded_quantities()
    assert [q.field for q in quantities] == [
        name for name in LimitSet.model_fields if name not in ("name", "description")
    ]
    by_field = {q.field: q for q in quantities}
    assert by_field["cell_voltage_high_v"].fault_prefix == "cell_voltage_high"
    assert by_field["cell_voltage_high_v"].label == "highest cell voltage"
    assert (by_field["temp_spread_c"].plausible_min, by_field["temp_spread_c"].plausible_max) == (
        0.1,
        100.0,
    )
    assert {q.fault_prefix for q in quantities} == {
        "cell_voltage_high", "cell_voltage_low", "temp_high_charge", "temp_low_charge",
        "temp_high_discharge", "temp_low_discharge", "charge_current", "discharge_current",
        "temp_spread", "cell_voltage_spread",
    }  # fmt: skip
