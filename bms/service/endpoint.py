"""What the control socket answers: the running loop's status, its faults, and clears.

The socket's thread calls these; they read what the loop last published (a status replaced
whole each cycle, never changed after) and hand a clear over to the loop's thread, which
decides it between two cycles (``ControlCycle.clear_latched``).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from typing import Any

from bms.loop import ControlCycle
from bms.report import status_record
from bms.service.control import CLEAR_TIMEOUT_S, Peer
from bms.store.state import StateStore, StoreError
from bms.types import PackStatus


def _clean(value: Any) -> Any:
    """NaN (not valid JSON) as None, through lists and dicts."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class ServiceEndpoint:
    """Handlers for bms.service.control.ControlServer, attached to a loop once it runs."""

    def __init__(self, config_source: str, store_path=None):
        self.config_source = config_source
        self.store_path = store_path
        self.cycle: ControlCycle | None = None
        self.status: PackStatus | None = None
        self.start_s = time.monotonic()
        self.cycle_time_mean_s = 0.0
        self.cycle_time_max_s = 0.0
        self.missed_cycles = 0
        self.stopping = False
        """Set when the loop has ended: the last status no longer describes the pack."""

    def handlers(self) -> dict:
        return {"status": self.handle_status, "faults": self.handle_faults, "clear": self.clear}

    def publish(self, status: PackStatus, mean_s: float, max_s: float, missed: int) -> None:
        """From the loop, every cycle: the newest status and timing (plain assignments)."""
        self.status = status
        self.cycle_time_mean_s, self.cycle_time_max_s, self.missed_cycles = mean_s, max_s, missed

    def handle_status(self) -> dict[str, Any]:
        status = self.status
        if self.stopping:
            return {"ok": False, "error": "the BMS is stopping: it is opening the contactors"}
        if status is None:
            return {"ok": False, "error": "the BMS is starting: no cycle has run yet"}
        record = status_record(
            status, self.start_s, self.cycle_time_mean_s, self.cycle_time_max_s, self.missed_cycles
        )
        record["soc"] = status.soc.tolist()
        record["cell_voltage_v"] = status.measurement.cell_voltage_v.tolist()
        record["cell_temp_c"] = status.measurement.cell_temp_c.tolist()
        return {
            "ok": True,
            "pid": os.getpid(),
            "config": self.config_source,
            "status": _clean(record),
        }

    def handle_faults(self) -> dict[str, Any]:
        latched = [] if self.cycle is None else list(self.cycle.latches.records.values())
        answer: dict[str, Any] = {
            "ok": True,
            "latched": [record.model_dump() for record in latched],
            "log": [],
        }
        if self.store_path is not None:
            try:
                answer["log"] = [
                    _clean(asdict(e)) for e in StateStore.read_fault_log(self.store_path)
                ]
            except StoreError as exc:
                answer["log_error"] = str(exc)
        return answer

    def clear(self, fault_ids: list[str] | None, peer: Peer) -> dict[str, Any]:
        if self.cycle is None:
            return {"ok": False, "error": "the BMS is starting: try again in a moment"}
        reply: Future = Future()
        self.cycle.requests.put((fault_ids, peer.name, reply))
        try:
            return reply.result(timeout=CLEAR_TIMEOUT_S)
        except FutureTimeout:
            if reply.cancel():
                return {"ok": False, "error": f"the loop did not answer in {CLEAR_TIMEOUT_S} s"}
            try:  # the loop has it in hand: its answer is the truth
                return reply.result(timeout=CLEAR_TIMEOUT_S)
            except FutureTimeout:
                return {"ok": False, "error": "the loop took the request but did not finish it"}
            except Exception as exc:
                return {"ok": False, "error": f"clearing failed: {exc}"}
        except Exception as exc:
            return {"ok": False, "error": f"clearing failed: {exc}"}
