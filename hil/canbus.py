"""The rig's ear on the CAN bus: every frame the board and its contactor box send, decoded
through the DBC, stamped on arrival, and counted for losses.

Each message with a rolling counter (the DBC's ``Counter`` signal, one per multiplexer value)
must advance it by one per frame; a jump is frames lost on the way (the bus, an adapter's
queue, or udp_multicast's socket buffer), counted per message. A test reads what it waits for
(the contactor feedback opening, a cell voltage coming back) with the arrival times, which is
how the rig measures reaction times independently of what the BMS says about itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bms.comms.dbc import DbcCodec

log = logging.getLogger(__name__)

HISTORY_FRAMES = 200_000
"""Frames kept for :meth:`BusMonitor.wait_for` (about 20 minutes of this DBC's traffic)."""

RELAYS = ("Negative", "Precharge", "Positive")


@dataclass(frozen=True, slots=True)
class Frame:
    t_s: float
    """Arrival, on this process's monotonic clock."""
    name: str
    values: dict[str, Any]


def all_open(values: dict[str, Any]) -> bool:
    """A contactor command or feedback frame with every relay open."""
    return all(values.get(relay) == 0 for relay in RELAYS)


def main_closed(values: dict[str, Any]) -> bool:
    return values.get("Negative") == 1 and values.get("Positive") == 1


class BusMonitor:
    """Listens on a bus handle of its own, on a thread of its own."""

    def __init__(self, can_options: dict[str, Any], dbc_file: Path):
        import can  # hardware library: only where a bus is opened

        self.codec = DbcCodec(dbc_file)
        self._messages = {message.frame_id: message for message in self.codec.db.messages}
        self.bus = can.Bus(**can_options)
        self._frames: deque[Frame] = deque(maxlen=HISTORY_FRAMES)
        self._appended = 0
        self._changed = threading.Condition()
        self._counters: dict[tuple[str, Any], int] = {}
        self.lost: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.error_frames = 0
        self.undecodable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rig-can-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.bus.shutdown()

    # ------------------------------------------------------------ receiving
    def _run(self) -> None:
        import can

        while not self._stop.is_set():
            try:
                frame = self.bus.recv(timeout=0.05)
            except can.CanError as exc:
                log.error("the rig's CAN receive failed: %s", exc)
                time.sleep(0.05)
                continue
            if frame is None:
                continue
            wall_to_monotonic_s = time.monotonic() - time.time()
            t_s = frame.timestamp + wall_to_monotonic_s if frame.timestamp else time.monotonic()
            self._take(min(t_s, time.monotonic()), frame)

    def _take(self, t_s: float, frame) -> None:
        if frame.is_error_frame:
            self.error_frames += 1
            return
        message = self._messages.get(frame.arbitration_id)
        if message is None:
            return
        try:
            values = self.codec.decode(message, bytes(frame.data))
        except Exception:  # cantools raises several types for a malformed frame
            self.undecodable += 1
            return
        name = message.name
        self.received[name] = self.received.get(name, 0) + 1
        with self._changed:
            if "Counter" in values:
                self._count(message, values)
            self._frames.append(Frame(t_s, name, values))
            self._appended += 1
            self._changed.notify_all()

    def _count(self, message, values: dict[str, Any]) -> None:
        raw = values["Counter"]
        if not isinstance(raw, int | float) or not math.isfinite(raw):
            return  # not available: nothing to count from (the frame itself is kept)
        mux = next((s.name for s in message.signals if s.is_multiplexer), None)
        key = (message.name, None if mux is None else values[mux])
        counter = int(raw)
        last = self._counters.get(key)
        if last is not None and counter != last:  # a repeat is no loss
            self.lost[message.name] = self.lost.get(message.name, 0) + (counter - last - 1) % 16
        self._counters[key] = counter

    def restart_counters(self) -> None:
        """A sender restarts its counters when it starts again (a new BMS process): that jump
        is no loss."""
        with self._changed:
            self._counters.clear()

    # ------------------------------------------------------------ reading
    def total_lost(self) -> int:
        return sum(self.lost.values())

    def latest(self, name: str) -> Frame | None:
        with self._changed:
            return next((f for f in reversed(self._frames) if f.name == name), None)

    def frames(self, name: str, after_s: float, until_s: float = float("inf")) -> list[Frame]:
        with self._changed:
            return [f for f in self._frames if f.name == name and after_s < f.t_s <= until_s]

    def wait_for(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        after_s: float,
        timeout_s: float,
    ) -> Frame | None:
        """The first ``name`` frame that arrived after ``after_s`` and satisfies
        ``predicate``, waiting until ``timeout_s`` from now; None if none came."""
        deadline_s = time.monotonic() + timeout_s
        with self._changed:
            found = None
            for frame in reversed(self._frames):  # arrival order: stop at after_s
                if frame.t_s <= after_s:
                    break
                if frame.name == name and predicate(frame.values):
                    found = frame
            if found is not None:
                return found
            seen = self._appended
            while (left_s := deadline_s - time.monotonic()) > 0:
                self._changed.wait(min(left_s, 0.1))
                new = min(self._appended - seen, len(self._frames))
                seen = self._appended
                for back in range(new, 0, -1):
                    frame = self._frames[-back]
                    if frame.name == name and frame.t_s > after_s and predicate(frame.values):
                        return frame
            return None
