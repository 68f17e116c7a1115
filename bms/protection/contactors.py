"""The contactor state machine: open → precharge → closed → opening, and fault.

Pure: it takes the time, the wish to close, the diagnosis verdict, the relay feedback and the
two voltages, and returns the relay command. Precharge (foxBMS ``bms.h``): close the negative
contactor and the precharge relay, wait until the DC link reaches ``precharge_ratio`` of the
pack voltage (within ``precharge_timeout_s``), close the positive contactor, then open the
precharge relay. A precharge starts only when nothing forbids a close and aborts as soon as
something does. Every step waits for the feedback to confirm the command (``relay_settle_s``).
Opening opens everything and watches the feedback: a contactor still closed after
``relay_settle_s`` is a weld. Two optional checks look past the feedback, whose auxiliary
contact can fail too: a link that charges in less than ``precharge_min_s`` had no precharge
resistor in its path (a welded positive contactor) or no capacitance (a disconnected load),
and a link still above ``link_decay_ratio`` of the pack voltage ``link_decay_s`` after an
opening is held up by a closed contact (or by a source on the link: a charger, so both are
off by default). The faults it finds are reported every cycle after they are found, so the
diagnosis table debounces and latches them like any other.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from bms.config import ControlConfig
from bms.types import ALL_OPEN, ContactorFeedback, ContactorState, RelayStates

FAULT_IDS = frozenset(
    {
        "contactor_weld",
        "contactor_feedback_mismatch",
        "contactor_open_unconfirmed",
        "precharge_failed",
        "precharge_too_fast",
        "link_voltage_held",
    }
)
"""Every fault this machine can find (diagnosis-table ids)."""

CHARGED_LINK_RATIO = 0.1
"""A link above this share of the pack voltage when a precharge starts is not judged by
precharge_min_s: from there a sound precharge is quick too."""

PRECHARGING = RelayStates(negative=True, precharge=True, positive=False)
BRIDGING = RelayStates(negative=True, precharge=True, positive=True)
CLOSED = RelayStates(negative=True, precharge=False, positive=True)


class _Step(enum.Enum):
    """Sub-steps of PRECHARGE: charge the link, close the positive contactor, open the
    precharge relay. Each re-enters PRECHARGE so its settle time counts from its own start."""

    CHARGE_LINK = 1
    CLOSE_POSITIVE = 2
    OPEN_PRECHARGE = 3


@dataclass(frozen=True, slots=True)
class ContactorOutput:
    state: ContactorState
    command: RelayStates
    faults: frozenset[str]


class ContactorStateMachine:
    """One instance per contactor box; call :meth:`step` once per cycle."""

    def __init__(self, config: ControlConfig):
        self.config = config
        self.state = ContactorState.OPEN
        self.command = ALL_OPEN
        self.faults: set[str] = set()
        self._step = _Step.CHARGE_LINK
        self._since_s = 0.0
        self._first_step = True
        self._link_was_charged = False
        self._watch_link_decay = False

    def step(
        self,
        t_s: float,
        close_requested: bool,
        open_now: bool,
        no_close: bool,
        feedback: ContactorFeedback,
        pack_voltage_v: float,
        link_voltage_v: float,
    ) -> ContactorOutput:
        """Advance one cycle and return the state and the relay command for this cycle."""
        if self._first_step:  # the start state's time counts from the first step
            self._first_step = False
            self._since_s = t_s
        in_state_s = t_s - self._since_s
        settle_s = self.config.relay_settle_s
        follows = feedback.valid and feedback.relays == self.command
        settled = follows or in_state_s < settle_s
        # Invalid feedback is the diagnosis table's concern (contactor_feedback_invalid); here
        # it only stops the machine from confirming anything.
        state = self.state

        if state is ContactorState.OPEN:
            if feedback.valid and feedback.relays.any_closed and in_state_s >= settle_s:
                # Nothing was commanded closed: a closed contact here is welded (or wired wrong).
                self.faults.add("contactor_weld")
                self._enter(ContactorState.FAULT, t_s, ALL_OPEN)
            elif self._link_held_up(in_state_s, pack_voltage_v, link_voltage_v):
                self.faults.add("link_voltage_held")
                self._enter(ContactorState.FAULT, t_s, ALL_OPEN)
            elif open_now:
                self._enter(ContactorState.FAULT, t_s, ALL_OPEN)
            elif close_requested and not no_close and follows:
                self._step = _Step.CHARGE_LINK
                # A link that is charged already (a charger holds it, or it has not bled
                # down since the last opening) may "precharge" fast: speed says nothing then.
                self._link_was_charged = link_voltage_v > CHARGED_LINK_RATIO * pack_voltage_v
                self._enter(ContactorState.PRECHARGE, t_s, PRECHARGING)

        elif state is ContactorState.PRECHARGE:
            if open_now or no_close or not close_requested:
                self._enter(ContactorState.OPENING, t_s, ALL_OPEN)
            elif not settled:
                self.faults.add("contactor_feedback_mismatch")
                self._enter(ContactorState.OPENING, t_s, ALL_OPEN)
            elif self._step is _Step.CHARGE_LINK:
                timed_s = self.config.precharge_time_s
                if timed_s is not None:  # no link voltage to watch: precharge for a set time
                    if follows and in_state_s >= timed_s:
                        self._step = _Step.CLOSE_POSITIVE
                        self._enter(ContactorState.PRECHARGE, t_s, BRIDGING)
                elif follows and _balanced(
                    link_voltage_v, pack_voltage_v, self.config.precharge_ratio
                ):
                    if self._too_fast(in_state_s):
                        self.faults.add("precharge_too_fast")
                        self._enter(ContactorState.OPENING, t_s, ALL_OPEN)
                    else:
                        self._step = _Step.CLOSE_POSITIVE
                        self._enter(ContactorState.PRECHARGE, t_s, BRIDGING)
                elif in_state_s >= self.config.precharge_timeout_s:
                    self.faults.add("precharge_failed")
                    self._enter(ContactorState.OPENING, t_s, ALL_OPEN)
            elif follows:
                if self._step is _Step.CLOSE_POSITIVE:
                    self._step = _Step.OPEN_PRECHARGE
                    self._enter(ContactorState.PRECHARGE, t_s, CLOSED)
                else:
                    self._enter(ContactorState.CLOSED, t_s, CLOSED)

        elif state is ContactorState.CLOSED:
            if open_now or not close_requested:
                self._enter(ContactorState.OPENING, t_s, ALL_OPEN)
            elif feedback.valid and not follows:
                self.faults.add("contactor_feedback_mismatch")
                self._enter(ContactorState.OPENING, t_s, ALL_OPEN)

        elif state is ContactorState.OPENING:
            if feedback.valid and not feedback.relays.any_closed:
                latched = open_now or bool(self.faults)
                self._enter(ContactorState.FAULT if latched else ContactorState.OPEN, t_s, ALL_OPEN)
                self._watch_link_decay = self.config.link_decay_s is not None
            elif in_state_s >= settle_s:
                unconfirmed = "contactor_weld" if feedback.valid else "contactor_open_unconfirmed"
                self.faults.add(unconfirmed)
                self._enter(ContactorState.FAULT, t_s, ALL_OPEN)

        else:  # FAULT: held while anything is latched or found here
            if feedback.valid and feedback.relays.any_closed:
                self.faults.add("contactor_weld")
            if self._link_held_up(in_state_s, pack_voltage_v, link_voltage_v):
                self.faults.add("link_voltage_held")
            if not open_now and not self.faults:
                self._enter(ContactorState.OPEN, t_s, ALL_OPEN)  # a person cleared it all

        return ContactorOutput(self.state, self.command, frozenset(self.faults))

    def clear(self, fault_id: str) -> None:
        """Forget a fault found here, once a person cleared its latch."""
        self.faults.discard(fault_id)

    def reconfigure(self, config: ControlConfig) -> None:
        """Take a reloaded [control] section; a check it turns off stops at once."""
        self.config = config
        if config.link_decay_s is None:
            self._watch_link_decay = False

    def cause_gone(
        self,
        fault_id: str,
        feedback: ContactorFeedback,
        pack_voltage_v: float,
        link_voltage_v: float,
    ) -> str | None:
        """None if the cause of ``fault_id`` (one of FAULT_IDS) is gone now, else why not:
        every relay must read open on valid feedback, and for a held-up link the link must
        have fallen, too (else the next close would meet what holds it)."""
        if not (feedback.valid and not feedback.relays.any_closed):
            return "the contactor feedback does not show every relay open"
        if fault_id == "link_voltage_held" and not (
            link_voltage_v <= self.config.link_decay_ratio * pack_voltage_v  # False for NaN
        ):
            return "the DC link is still charged (or its voltage is unknown)"
        return None

    def _too_fast(self, in_state_s: float) -> bool:
        minimum_s = self.config.precharge_min_s
        return minimum_s is not None and in_state_s < minimum_s and not self._link_was_charged

    def _link_held_up(self, in_state_s: float, pack_voltage_v: float, link_voltage_v: float):
        """Once, ``link_decay_s`` after an opening: is the link still charged?"""
        if not self._watch_link_decay or in_state_s < self.config.link_decay_s:
            return False
        self._watch_link_decay = False
        return link_voltage_v > self.config.link_decay_ratio * pack_voltage_v

    def _enter(self, state: ContactorState, t_s: float, command: RelayStates) -> None:
        self.state = state
        self.command = command
        self._since_s = t_s


def _balanced(link_voltage_v: float, pack_voltage_v: float, ratio: float) -> bool:
    """The link is within (1 - ratio) of the pack voltage, from below or from above (a charger
    may hold the link higher): only then may the main contactor close across them."""
    if math.isnan(link_voltage_v) or math.isnan(pack_voltage_v) or pack_voltage_v <= 0.0:
        return False
    return abs(pack_voltage_v - link_voltage_v) <= (1.0 - ratio) * pack_voltage_v
