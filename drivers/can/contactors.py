"""A contactor box (PDU) on CAN: relay commands out, auxiliary-contact feedback in.

The command frame is sent every cycle and is the box's dead-man refresh: the box opens every
relay when the frames stop (a hung or killed BMS process opens the contactors).
"""

from __future__ import annotations

from pydantic import Field

from bms.backends import ContactorDriver
from bms.comms.dbc import DbcError
from bms.config import BmsConfig
from bms.schema import StrictModel
from bms.types import ContactorFeedback, RelayStates
from drivers.can.link import CanBackend, CanLink, RollingCounter

RELAY_SIGNALS = ("Negative", "Precharge", "Positive", "Counter")


def relay_signals(relays: RelayStates, counter: int) -> dict[str, int]:
    """The signal values of a command or feedback frame."""
    return {
        "Negative": int(relays.negative),
        "Precharge": int(relays.precharge),
        "Positive": int(relays.positive),
        "Counter": counter,
    }


def relays_from_signals(values: dict[str, float]) -> RelayStates:
    return RelayStates(
        negative=values["Negative"] == 1,
        precharge=values["Precharge"] == 1,
        positive=values["Positive"] == 1,
    )


class CanContactorsOptions(StrictModel):
    command_message: str = "BMS_ContactorCommand"
    feedback_message: str = "PDU_ContactorFeedback"
    frame_timeout_s: float = Field(0.5, gt=0.0, le=60.0)


class CanContactors(CanBackend, ContactorDriver):
    Options = CanContactorsOptions

    def __init__(self, config: BmsConfig, options: CanContactorsOptions):
        self.options = options
        self.link = CanLink.acquire(config)
        with self.link.released_on_error() as link:
            self.command_message = link.codec.message(options.command_message, RELAY_SIGNALS)
            feedback_signals = list(RELAY_SIGNALS)
            if config.protection.interlock:  # the pack has a loop: the DBC must carry it
                feedback_signals.append("InterlockClosed")
            self._feedback_message = link.codec.message(options.feedback_message, feedback_signals)
            muxed = [
                name
                for name in feedback_signals
                if self._feedback_message.get_signal_by_name(name).multiplexer_ids
            ]
            if muxed:
                raise DbcError(
                    f"{link.codec.path}: {options.feedback_message}.{muxed[0]} is multiplexed; "
                    "the feedback signals must be in every frame"
                )
        self.link.subscribe(
            self._feedback_message.frame_id, self._on_feedback, "contactor feedback"
        )
        self._relays: RelayStates | None = None
        self._interlock_closed: bool | None = None
        self._rx_t_s = float("-inf")
        self._counter = 0
        self.feedback_counter = RollingCounter()

    def _on_feedback(self, t_s: float, data: bytes) -> None:
        try:
            values = self.link.codec.decode(self._feedback_message, data)
        except Exception:
            self._relays = None  # a malformed feedback frame proves nothing
            return
        if self.feedback_counter.advanced(values["Counter"]):
            self._relays = relays_from_signals(values)
            self._interlock_closed = (
                None if "InterlockClosed" not in values else values["InterlockClosed"] == 1
            )
            self._rx_t_s = t_s

    def command(self, relays: RelayStates) -> None:
        self._counter = (self._counter + 1) % 16
        self.link.send(self.command_message, relay_signals(relays, self._counter))

    def feedback(self, t_s: float) -> ContactorFeedback:
        self.link.poll(t_s)
        fresh = self._relays is not None and t_s - self._rx_t_s <= self.options.frame_timeout_s
        if not fresh:
            return ContactorFeedback(RelayStates(), valid=False)
        return ContactorFeedback(self._relays, valid=True, interlock_closed=self._interlock_closed)
