"""The contactor state machine against a relay model with feedback and a DC link."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from bms.config import ControlConfig
from bms.protection.contactors import ContactorStateMachine
from bms.types import ALL_OPEN, ContactorFeedback, ContactorState, RelayStates

PERIOD_S = 0.1
PACK_V = 60.0
CONFIG = ControlConfig(
    close_on_start=True, precharge_ratio=0.95, precharge_timeout_s=2.0, relay_settle_s=0.3
)


@dataclass
class Box:
    """Relays that follow the command one cycle later, and a DC link that charges through
    the precharge resistor (time constant ``tau_s``)."""

    tau_s: float = 0.2
    relays: RelayStates = ALL_OPEN
    link_v: float = 0.0
    welded: bool = False
    stuck_open: bool = False
    feedback_valid: bool = True
    holds_link: bool = False
    """A source on the link (or a weld the feedback does not show) keeps it charged."""
    log: list[ContactorState] = field(default_factory=list)

    def obey(self, command: RelayStates) -> None:
        positive = (command.positive and not self.stuck_open) or (
            self.welded and self.relays.positive
        )
        self.relays = RelayStates(command.negative, command.precharge, positive)
        if self.relays.negative and self.relays.positive:
            self.link_v = PACK_V
        elif self.relays.negative and self.relays.precharge:
            self.link_v += (PACK_V - self.link_v) * min(1.0, PERIOD_S / self.tau_s)
        elif not self.holds_link:
            self.link_v *= 0.5

    def feedback(self) -> ContactorFeedback:
        return ContactorFeedback(self.relays, self.feedback_valid)


def drive(fsm, box, cycles, t0_s=0.0, close=True, open_now=False, no_close=False):
    out = None
    for n in range(cycles):
        out = fsm.step(
            t0_s + n * PERIOD_S, close, open_now, no_close, box.feedback(), PACK_V, box.link_v
        )
        box.log.append(out.state)
        box.obey(out.command)
    return out


def test_precharge_then_close_in_order():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    commands = []
    for n in range(20):
        out = fsm.step(n * PERIOD_S, True, False, False, box.feedback(), PACK_V, box.link_v)
        commands.append(out.command)
        box.obey(out.command)
    assert out.state is ContactorState.CLOSED
    assert out.command == RelayStates(negative=True, precharge=False, positive=True)
    # negative + precharge first, positive only after the link is charged, precharge last off
    firsts = list(dict.fromkeys(commands))
    assert firsts == [
        RelayStates(True, True, False),
        RelayStates(True, True, True),
        RelayStates(True, False, True),
    ]
    assert out.faults == frozenset()


def test_no_close_while_a_fault_forbids_it():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    out = drive(fsm, box, 10, no_close=True)
    assert out.state is ContactorState.OPEN and out.command == ALL_OPEN


def test_precharge_timeout_is_a_fault():
    fsm, box = ContactorStateMachine(CONFIG), Box(tau_s=100.0)  # link never charges in time
    out = drive(fsm, box, 30)
    assert "precharge_failed" in out.faults
    assert out.state is ContactorState.FAULT and out.command == ALL_OPEN


def test_open_now_opens_and_ends_in_fault():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    drive(fsm, box, 20)
    out = drive(fsm, box, 1, t0_s=2.0, open_now=True)
    assert out.state is ContactorState.OPENING and out.command == ALL_OPEN
    out = drive(fsm, box, 3, t0_s=2.1, open_now=True)
    assert out.state is ContactorState.FAULT and out.faults == frozenset()
    assert not box.relays.any_closed


def test_withdrawn_request_opens_back_to_open():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    drive(fsm, box, 20)
    out = drive(fsm, box, 4, t0_s=2.0, close=False)
    assert out.state is ContactorState.OPEN


def test_weld_is_found_when_opening():
    fsm, box = ContactorStateMachine(CONFIG), Box(welded=True)
    drive(fsm, box, 20)
    out = drive(fsm, box, 10, t0_s=2.0, open_now=True)
    assert "contactor_weld" in out.faults
    assert out.state is ContactorState.FAULT and out.command == ALL_OPEN


def test_contactor_that_does_not_close_is_a_mismatch():
    fsm, box = ContactorStateMachine(CONFIG), Box(stuck_open=True)
    out = drive(fsm, box, 20)
    assert "contactor_feedback_mismatch" in out.faults
    assert out.state is ContactorState.FAULT


def test_contactor_that_opens_by_itself_is_a_mismatch():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    drive(fsm, box, 20)
    box.relays = RelayStates(True, False, False)
    out = drive(fsm, box, 1, t0_s=2.0)
    assert "contactor_feedback_mismatch" in out.faults
    assert out.command == ALL_OPEN


def test_invalid_feedback_never_confirms_a_close():
    fsm, box = ContactorStateMachine(CONFIG), Box(feedback_valid=False)
    out = drive(fsm, box, 20)
    assert out.state is ContactorState.OPEN and out.command == ALL_OPEN


def test_a_fault_appearing_during_precharge_aborts_it():
    fsm, box = ContactorStateMachine(CONFIG), Box(tau_s=1.0)
    drive(fsm, box, 2)
    assert fsm.state is ContactorState.PRECHARGE
    out = drive(fsm, box, 1, t0_s=0.2, no_close=True)
    assert out.state is ContactorState.OPENING and out.command == ALL_OPEN
    out = drive(fsm, box, 2, t0_s=0.3, no_close=True)
    assert out.state is ContactorState.OPEN and out.faults == frozenset()


def test_a_link_held_above_the_pack_does_not_count_as_precharged():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    for n in range(30):
        out = fsm.step(n * PERIOD_S, True, False, False, box.feedback(), PACK_V, 80.0)
        box.obey(out.command)
        assert not out.command.positive, "the main contactor must not close across 20 V"
    assert "precharge_failed" in out.faults


def test_precharge_completes_only_once_the_relays_are_confirmed():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    # the link already sits at pack voltage, but nothing has been confirmed closed yet
    out = fsm.step(0.0, True, False, False, box.feedback(), PACK_V, PACK_V)
    assert out.command == RelayStates(True, True, False)
    out = fsm.step(0.1, True, False, False, box.feedback(), PACK_V, PACK_V)  # not obeyed yet
    assert out.command == RelayStates(True, True, False)


def test_opening_that_feedback_cannot_confirm_is_its_own_fault():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    drive(fsm, box, 20)
    box.feedback_valid = False
    out = drive(fsm, box, 10, t0_s=2.0, open_now=True)
    assert out.state is ContactorState.FAULT
    assert out.faults == frozenset({"contactor_open_unconfirmed"})


def test_time_starts_at_the_first_step_not_at_zero():
    fsm = ContactorStateMachine(CONFIG)
    closed = ContactorFeedback(RelayStates(True, False, True), valid=True)
    # a restart on the monotonic clock (t = 5000 s) finding the relays still closed
    out = fsm.step(5000.0, True, False, False, closed, PACK_V, PACK_V)
    assert out.faults == frozenset()
    out = fsm.step(
        5000.0 + CONFIG.relay_settle_s + 0.01, True, False, False, closed, PACK_V, PACK_V
    )
    assert out.faults == frozenset({"contactor_weld"})


def test_an_unknown_link_voltage_never_completes_a_precharge():
    fsm, box = ContactorStateMachine(CONFIG), Box()
    for n in range(30):
        out = fsm.step(n * PERIOD_S, True, False, False, box.feedback(), PACK_V, float("nan"))
        box.obey(out.command)
        assert not out.command.positive
    assert "precharge_failed" in out.faults


CHECKED = CONFIG.model_copy(update={"precharge_min_s": 0.3, "link_decay_s": 2.0})


def test_a_link_that_charges_too_fast_had_no_precharge_resistor_in_its_path():
    fsm, box = ContactorStateMachine(CHECKED), Box(tau_s=0.01)
    out = drive(fsm, box, 20)
    assert "precharge_too_fast" in out.faults
    assert out.state is ContactorState.FAULT and out.command == ALL_OPEN
    assert ContactorState.CLOSED not in box.log
    # the same link with its resistor (tau 0.2 s: about 0.5 s to 95 %) closes
    fsm, box = ContactorStateMachine(CHECKED), Box(tau_s=0.2)
    assert drive(fsm, box, 20).state is ContactorState.CLOSED


def test_a_link_a_charger_already_holds_at_pack_voltage_may_close_at_once():
    fsm, box = ContactorStateMachine(CHECKED), Box(tau_s=0.01, link_v=PACK_V, holds_link=True)
    out = drive(fsm, box, 20)
    assert out.state is ContactorState.CLOSED and out.faults == frozenset()


def test_precharge_speed_is_not_checked_unless_configured():
    fsm, box = ContactorStateMachine(CONFIG), Box(tau_s=0.01)
    assert drive(fsm, box, 20).state is ContactorState.CLOSED


def test_a_link_that_stays_charged_after_opening_is_a_hidden_weld():
    fsm, box = ContactorStateMachine(CHECKED), Box(holds_link=True)
    drive(fsm, box, 20)
    out = drive(fsm, box, 5, t0_s=2.0, close=False)
    assert out.state is ContactorState.OPEN  # the feedback shows everything open
    out = drive(fsm, box, 20, t0_s=2.5, close=False)  # link_decay_s (2 s) after the opening
    assert "link_voltage_held" in out.faults
    assert out.state is ContactorState.FAULT


def test_a_link_that_decays_after_opening_is_healthy_and_checked_once():
    fsm, box = ContactorStateMachine(CHECKED), Box()
    drive(fsm, box, 20)
    out = drive(fsm, box, 40, t0_s=2.0, close=False)
    assert out.state is ContactorState.OPEN and out.faults == frozenset()
    box.link_v = PACK_V  # charged again later by something else: no longer this check's case
    box.holds_link = True
    out = drive(fsm, box, 40, t0_s=6.0, close=False)
    assert out.state is ContactorState.OPEN and out.faults == frozenset()


def test_the_link_check_waits_exactly_link_decay_s():
    fsm, box = ContactorStateMachine(CHECKED), Box(holds_link=True)
    drive(fsm, box, 20)
    fsm.step(2.0, False, False, False, box.feedback(), PACK_V, box.link_v)  # -> opening
    box.obey(ALL_OPEN)
    out = fsm.step(2.1, False, False, False, box.feedback(), PACK_V, box.link_v)  # -> open
    assert out.state is ContactorState.OPEN
    open_s = 2.1
    out = fsm.step(open_s + 1.999, False, False, False, box.feedback(), PACK_V, box.link_v)
    assert out.faults == frozenset()
    out = fsm.step(open_s + 2.001, False, False, False, box.feedback(), PACK_V, box.link_v)
    assert "link_voltage_held" in out.faults


def test_a_link_held_up_after_a_fault_opening_is_reported_too():
    """After a fault opening the pack is latched anyway, but a person must learn that it may
    still be connected."""
    fsm, box = ContactorStateMachine(CHECKED), Box(holds_link=True)
    drive(fsm, box, 20)
    out = drive(fsm, box, 40, t0_s=2.0, open_now=True)
    assert out.state is ContactorState.FAULT
    assert "link_voltage_held" in out.faults


def test_a_fault_state_is_left_only_when_nothing_holds_it():
    """FAULT holds while anything is latched (open_now) or found here; once a person has
    cleared all of it, the machine is OPEN and may close again."""
    fsm, box = ContactorStateMachine(CONFIG), Box(welded=True)
    drive(fsm, box, 20)
    out = drive(fsm, box, 10, t0_s=2.0, close=False)
    assert "contactor_weld" in out.faults and out.state is ContactorState.FAULT
    box.welded = False
    box.relays = ALL_OPEN  # repaired
    assert drive(fsm, box, 3, t0_s=3.0, open_now=True).state is ContactorState.FAULT
    fsm.clear("contactor_weld")
    assert drive(fsm, box, 3, t0_s=3.3, open_now=True).state is ContactorState.FAULT
    assert drive(fsm, box, 1, t0_s=3.6, open_now=False).state is ContactorState.OPEN
    assert drive(fsm, box, 20, t0_s=3.7).state is ContactorState.CLOSED


OPEN_FEEDBACK = ContactorFeedback(ALL_OPEN, valid=True)


def test_the_cause_of_a_contactor_fault_is_gone_only_with_every_relay_read_open():
    fsm = ContactorStateMachine(CHECKED)
    closed = ContactorFeedback(RelayStates(positive=True), valid=True)
    invalid = ContactorFeedback(ALL_OPEN, valid=False)
    assert fsm.cause_gone("contactor_weld", OPEN_FEEDBACK, PACK_V, 0.0) is None
    assert "does not show every relay open" in fsm.cause_gone("contactor_weld", closed, PACK_V, 0)
    assert fsm.cause_gone("contactor_open_unconfirmed", invalid, PACK_V, 0.0) is not None


def test_a_held_link_must_also_have_fallen_below_its_ratio():
    fsm = ContactorStateMachine(CHECKED)  # link_decay_ratio 0.5
    assert fsm.cause_gone("link_voltage_held", OPEN_FEEDBACK, PACK_V, 0.5 * PACK_V) is None
    held = fsm.cause_gone("link_voltage_held", OPEN_FEEDBACK, PACK_V, 0.51 * PACK_V)
    assert "still charged" in held
    assert fsm.cause_gone("link_voltage_held", OPEN_FEEDBACK, PACK_V, float("nan")) is not None
    # the ratio applies only to this fault
    assert fsm.cause_gone("precharge_failed", OPEN_FEEDBACK, PACK_V, PACK_V) is None


def test_a_reload_keeps_a_link_watch_it_still_asks_for_and_ends_one_it_drops():
    fsm, box = ContactorStateMachine(CHECKED), Box(holds_link=True)
    drive(fsm, box, 20)
    drive(fsm, box, 5, t0_s=2.0, close=False)  # opened: the watch runs
    fsm.reconfigure(CHECKED.model_copy(update={"link_decay_ratio": 0.4}))
    out = drive(fsm, box, 25, t0_s=2.5, close=False)
    assert "link_voltage_held" in out.faults  # still watched, with the new config
    fsm, box = ContactorStateMachine(CHECKED), Box(holds_link=True)
    drive(fsm, box, 20)
    drive(fsm, box, 5, t0_s=2.0, close=False)
    fsm.reconfigure(CHECKED.model_copy(update={"link_decay_s": None}))
    out = drive(fsm, box, 25, t0_s=2.5, close=False)
    assert out.faults == frozenset() and out.state is ContactorState.OPEN


TIMED = CONFIG.model_copy(update={"precharge_time_s": 0.5})


def test_a_timed_precharge_closes_after_its_time_without_a_link_voltage():
    """A front-end without a DC-link voltage (a JBD): the link is precharged for a set time."""
    fsm, box = ContactorStateMachine(TIMED), Box()
    states, commands = [], []
    for n in range(20):
        out = fsm.step(n * PERIOD_S, True, False, False, box.feedback(), PACK_V, float("nan"))
        states.append(out.state)
        commands.append(out.command)
        box.obey(out.command)
    assert out.state is ContactorState.CLOSED and out.faults == frozenset()
    first_bridging = commands.index(RelayStates(True, True, True))
    first_precharging = commands.index(RelayStates(True, True, False))
    # precharging entered at its cycle; bridging 0.5 s (5 cycles) later, not before
    assert first_bridging - first_precharging == 5
    # then, as from a measured link: positive closed, precharge opened, each confirmed
    after = list(zip(states, commands, strict=True))[first_bridging : first_bridging + 3]
    assert after == [
        (ContactorState.PRECHARGE, RelayStates(True, True, True)),
        (ContactorState.PRECHARGE, RelayStates(True, False, True)),
        (ContactorState.CLOSED, RelayStates(True, False, True)),
    ]


def test_timed_precharge_is_refused_next_to_checks_that_need_a_link_voltage():
    with pytest.raises(ValidationError, match="precharge_min_s needs a link voltage"):
        ControlConfig(close_on_start=True, precharge_time_s=0.5, precharge_min_s=0.1)
    with pytest.raises(ValidationError, match="below precharge_timeout_s"):
        ControlConfig(close_on_start=True, precharge_time_s=3.0, precharge_timeout_s=3.0)


def test_a_link_still_partly_charged_from_the_last_opening_is_not_judged_by_speed():
    """A quick restart: the link has bled to 60 % since the last opening (the sim's bleeder
    takes 40 s); topping it up is fast and sound, not a hidden weld."""
    fsm, box = ContactorStateMachine(CHECKED), Box(tau_s=0.01, link_v=0.6 * PACK_V)
    assert drive(fsm, box, 20).state is ContactorState.CLOSED
    fsm, box = ContactorStateMachine(CHECKED), Box(tau_s=0.01, link_v=0.09 * PACK_V)
    assert "precharge_too_fast" in drive(fsm, box, 20).faults  # from (nearly) empty: judged
