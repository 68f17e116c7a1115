"""A contactor box (PDU) on CAN: relay commands out, auxiliary-contact feedback in.

The command frame is sent every cycle and is the box's dead-man refresh: the box opens every
relay when the frames stop (a hung or killed BMS process opens the contactors).
"""

from __future__ import annotations

from pydantic import Field

from bms.backends import ContactorDriver
from bms.config import BmsConfig, StrictModel
from bms.types import ContactorFeedback, RelayStates
from drivers.can.link import CanLink

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
    feedback_timeout_s: float = Field(0.5, gt=0.0, le=60.0)


class CanContactors(ContactorDriver):
    Options = CanContactorsOptions

    def __init__(self, config: BmsConfig, options: CanContactorsOptions):
        self.options = options
        self.link = CanLink.acquire(config)
        try:
            self.command_message = self.link.codec.message(options.command_message, RELAY_SIGNALS)
            feedback = self.link.codec.message(options.feedback_message, RELAY_SIGNALS)
        except Exception:
            self.link.release()
            raise
        self.link.subscribe(feedback.frame_id, self._on_feedback)
        self._feedback_message = feedback
        self._relays: RelayStates | None = None
        self._rx_t_s = float("-inf")
        self._counter = 0

    def _on_feedback(self, t_s: float, data: bytes) -> None:
        try:
            values = self.link.codec.decode(self._feedback_message, data)
        except Exception:
            self._relays = None  # a malformed feedback frame proves nothing
            return
        self._relays = relays_from_signals(values)
        self._rx_t_s = t_s

    def command(self, relays: RelayStates) -> None:
        self._counter = (self._counter + 1) % 16
        self.link.send(self.command_message, relay_signals(relays, self._counter))

    def feedback(self, t_s: float) -> ContactorFeedback:
        self.link.poll(t_s)
        fresh = self._relays is not None and t_s - self._rx_t_s <= self.options.feedback_timeout_s
        if not fresh:
            return ContactorFeedback(RelayStates(), valid=False)
        return ContactorFeedback(self._relays, valid=True)

    def close(self) -> None:
        if self.link is not None:
            self.link.release()
            self.link = None
