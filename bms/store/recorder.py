"""What the loop persists through the state store, and what a start takes back from it.

Every ``interval_s`` the pack's state (SOC and sigma per cell, SOH, throughput) goes to the
writer thread, and so does every latched and every cleared fault as it happens; the last
state goes out on the way down. At start the newest state comes back: the throughput totals
always, the SOC only when it is younger than a rest (``rest_time_s``): a pack that rested
longer is better started from its OCV, which the estimator does by itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import math

import numpy as np

from bms.health.throughput import Throughput
from bms.store.state import PackState, StateStore, StoreError
from bms.store.writer import StoreWriter
from bms.types import Estimate, Measurement

log = logging.getLogger(__name__)


class PackRecorder:
    """Owns the store (through its writer) for one run of the loop."""

    def __init__(self, store: StateStore, interval_s: float, capacity_ah: float):
        """``capacity_ah``: nominal, of one series group (for equivalent full cycles)."""
        self.interval_s = interval_s
        self.moved_aside = store.moved_aside
        try:
            self.restored = store.latest_state()
        except StoreError as exc:
            log.error("%s: starting from the OCV", exc)
            self.restored = None
        self.latched_copy = store.latched()
        self.writer = StoreWriter(store)
        previous = self.restored
        self.throughput = Throughput(
            capacity_ah,
            *(
                (0.0, 0.0, 0.0, 0.0)
                if previous is None
                else (
                    previous.charged_ah,
                    previous.discharged_ah,
                    previous.charged_wh,
                    previous.discharged_wh,
                )
            ),
        )
        self._next_s = -math.inf
        self._last: PackState | None = None

    @property
    def failed(self) -> bool:
        return self.writer.failed

    def start(self) -> None:
        self.writer.start()

    def restored_soc(
        self, n_cells: int, rest_time_s: float, now_utc: dt.datetime | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(soc, soc_std) to start from, or None to start from the OCV; says why in the log."""
        state = self.restored
        if state is None:
            return None
        if len(state.soc) != n_cells:
            log.warning(
                "stored SOC is for %d cells, the pack has %d: starting from the OCV",
                len(state.soc),
                n_cells,
            )
            return None
        now_utc = now_utc or dt.datetime.now(dt.UTC)
        try:
            age_s = (now_utc - dt.datetime.fromisoformat(state.written_utc)).total_seconds()
        except (ValueError, TypeError) as exc:
            log.error("stored SOC has an unreadable time (%s): starting from the OCV", exc)
            return None
        if not 0.0 <= age_s < rest_time_s:
            log.info(
                "stored SOC is %.0f s old (rest_time_s %.0f s): starting from the OCV",
                age_s,
                rest_time_s,
            )
            return None
        soc, soc_std = np.array(state.soc, dtype=float), np.array(state.soc_std, dtype=float)
        if np.isnan(soc).any() or np.isnan(soc_std).any():
            log.info("stored SOC has unknown cells: starting from the OCV")
            return None
        log.info("starting from the SOC stored %.0f s ago", age_s)
        return soc, soc_std

    def on_cycle(
        self, t_s: float, dt_s: float, m: Measurement, estimate: Estimate, soh: np.ndarray
    ) -> None:
        self.throughput.add(m.current_a, m.pack_voltage_v, dt_s)
        self._last = self._state(estimate, soh)
        if t_s >= self._next_s:
            self._next_s = t_s + self.interval_s
            self.writer.submit_state(self._last)

    def _state(self, estimate: Estimate, soh: np.ndarray) -> PackState:
        t = self.throughput
        return PackState(
            soc=estimate.soc.tolist(),
            soc_std=estimate.soc_std.tolist(),
            soh=soh.tolist(),
            charged_ah=t.charged_ah,
            discharged_ah=t.discharged_ah,
            charged_wh=t.charged_wh,
            discharged_wh=t.discharged_wh,
            equivalent_full_cycles=t.equivalent_full_cycles,
        )

    def on_latched(self, fault_id: str, latched_utc: str, description: str, sample: dict):
        self.writer.submit(lambda s: s.log_fault(fault_id, latched_utc, description, sample))

    def on_cleared(self, fault_id: str, cleared_utc: str, cleared_by: str) -> None:
        self.writer.submit(lambda s: s.log_clear(fault_id, cleared_utc, cleared_by))

    def copy_latched(self, records: dict[str, tuple[str, str]]) -> None:
        """Latches the store's copy lacks (fault id -> (latched_utc, description))."""
        for fault_id, (when, text) in records.items():
            self.writer.submit(lambda s, f=fault_id, w=when, d=text: s.copy_latched(f, w, d))

    def note(self, key: str, value: str) -> None:
        self.writer.submit(lambda s: s.set_meta(key, value))

    def close(self) -> None:
        """Write the last state and everything queued, then close the store."""
        if self._last is not None:
            self.writer.submit_state(self._last)
        self.writer.close()
