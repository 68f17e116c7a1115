"""State of health of every cell, beside the control loop.

The loop offers its newest sample once per ``sample_period_s`` (the pack current, each cell's
voltage and temperature, the EKF's SOC and sigma); this never blocks, and a sample that finds
the queue full is dropped and counted. A thread of its own feeds every cell's online estimator
(bms/health/online.py: capacity between rested anchors, resistance growth from current steps)
and keeps the samples of the charge under way; when a charge ends it finds the charge segment
in each cell's voltage (bms/health/features.py), and the int8 TFLite model (bms/health/runner.py)
estimates each cell's capacity from its features. The newest :class:`PackHealth` result, with
its time, is there for the loop to publish, persist and cross-check: an ML and an online
capacity further apart than their combined uncertainty allows is a warning, not hidden.

Memory is bounded: the charge's samples are float32 and, when a charge outgrows the buffer
(``MAX_SEGMENT_BYTES``: long charges of very large packs), every other sample is dropped and the
spacing doubles.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from bms.estimation.cell_params import CellParams
from bms.health.features import (
    CHARGING_C_RATE,
    MIN_GAP_S,
    NoChargeSegment,
    charge_features,
    find_charge_segments,
)
from bms.health.online import CROSS_CHECK_SIGMA, OnlineHealth, disagreement_sigma
from bms.health.runner import SohModel

log = logging.getLogger(__name__)

MAX_SEGMENT_BYTES = 20 * 1024 * 1024
"""Bound on the samples of one charge kept for its features."""
QUEUE_SAMPLES = 600
"""Samples the thread may fall behind by before the loop's offers are dropped."""


@dataclass(frozen=True)
class PackHealth:
    """The newest state of health of every cell; arrays (n_cells,), NaN where unknown.

    ``t_s``: time.monotonic() when it was made. Capacities in Ah (1-sigma ``*_std``);
    ``resistance_growth``: the cell's R0 over the parameter set's. ``disagree``: cells whose ML
    and online capacities are more than CROSS_CHECK_SIGMA combined sigmas apart."""

    t_s: float
    capacity_online_ah: np.ndarray
    capacity_online_std_ah: np.ndarray
    capacity_ml_ah: np.ndarray
    capacity_ml_std_ah: np.ndarray
    resistance_growth: np.ndarray
    resistance_growth_std: np.ndarray
    disagree: np.ndarray
    nominal_capacity_ah: float

    @property
    def soh(self) -> np.ndarray:
        """Each cell's capacity as a fraction of nominal: the online estimate where it has
        one (a measurement), else the model's, else NaN."""
        online = self.capacity_online_ah
        return np.where(np.isnan(online), self.capacity_ml_ah, online) / self.nominal_capacity_ah


class _Charge:
    """The samples of the charge under way, decimated to stay under MAX_SEGMENT_BYTES."""

    def __init__(self, n_cells: int):
        self.capacity = max(64, MAX_SEGMENT_BYTES // (4 * (2 * n_cells + 2)))
        self.rows = np.empty((self.capacity, 2 * n_cells + 2), dtype=np.float32)
        self.count = 0
        self.stride = 1
        self._skipped = 0
        self.t0_s = math.nan

    def add(self, t_s: float, current_a: float, voltage_v: np.ndarray, temp_c: np.ndarray):
        if self.count == 0:
            self.t0_s = t_s  # times are kept relative: float32 would lose seconds of uptime
        self._skipped += 1
        if self._skipped < self.stride:
            return
        self._skipped = 0
        if self.count == self.capacity:
            kept = self.rows[: self.count : 2].copy()
            self.count = kept.shape[0]
            self.rows[: self.count] = kept
            self.stride *= 2
        self.rows[self.count, 0] = t_s - self.t0_s
        self.rows[self.count, 1] = current_a
        self.rows[self.count, 2 : 2 + voltage_v.size] = voltage_v
        self.rows[self.count, 2 + voltage_v.size :] = temp_c
        self.count += 1

    def columns(self, n_cells: int):
        rows = self.rows[: self.count].astype(np.float64)
        return rows[:, 0], rows[:, 1], rows[:, 2 : 2 + n_cells], rows[:, 2 + n_cells :]


class HealthService:
    """Owns the online estimators, the charge buffer and the model for one run of the loop."""

    def __init__(
        self,
        cell: CellParams,
        n_cells: int,
        n_parallel: int = 1,
        model: SohModel | None = None,
        sample_period_s: float = 1.0,
    ):
        self.cell = cell
        self.n_cells = n_cells
        self.n_parallel = n_parallel
        self.model = model
        self.sample_period_s = sample_period_s
        self.dropped_samples = 0
        self.latest: PackHealth | None = None
        self._online = [OnlineHealth(cell) for _ in range(n_cells)]
        nan = np.full(n_cells, math.nan)
        self._ml_ah, self._ml_std_ah = nan.copy(), nan.copy()
        self._features: list = [None] * n_cells
        """Each cell's newest charge features not yet estimated (the model also needs the
        resistance growth, which the online estimator may learn only after the charge)."""
        self._charge = _Charge(n_cells)
        self._charging = False
        self._last_t_s = -math.inf
        self._offered_s = -math.inf
        self._samples: queue.Queue = queue.Queue(maxsize=QUEUE_SAMPLES)
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def offer(
        self,
        t_s: float,
        pack_current_a: float,
        cell_voltage_v: np.ndarray,
        cell_temp_c: np.ndarray,
        soc: np.ndarray,
        soc_std: np.ndarray,
    ) -> None:
        """From the loop, every cycle; takes one sample per ``sample_period_s``, never
        blocks. cell_voltage_v, cell_temp_c (each cell's), soc, soc_std: (n_cells,)."""
        if t_s - self._offered_s < self.sample_period_s:
            return
        self._offered_s = t_s
        sample = (t_s, pack_current_a / self.n_parallel, cell_voltage_v.copy(),
                  cell_temp_c.copy(), soc.copy(), soc_std.copy())  # fmt: skip
        try:
            self._samples.put_nowait(sample)
        except queue.Full:
            self.dropped_samples += 1

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self._samples.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.take(*sample)
            except Exception:  # a bug here must not end the estimates for the whole run
                log.exception("state-of-health sample failed")

    def take(self, t_s, current_a, voltage_v, temp_c, soc, soc_std) -> None:
        """One sample (cell current, A): the online estimators, and the charge's samples;
        at a charge's end, the model. Runs on the service's thread (or a test's)."""
        for c, online in enumerate(self._online):
            online.update(t_s, current_a, voltage_v[c], temp_c[c], soc[c], soc_std[c])
        charging = current_a >= CHARGING_C_RATE * self.cell.capacity_ah  # False for NaN
        if t_s - self._last_t_s > MIN_GAP_S:
            self._charge = _Charge(self.n_cells)  # a gap: the charge across it is unknown
        self._last_t_s = t_s
        if charging:
            self._charge.add(t_s, current_a, voltage_v, temp_c)
        elif self._charging and self._charge.count:
            self._charge.add(t_s, current_a, voltage_v, temp_c)  # the sample that ends it
            self._charge_ended()
            self._charge = _Charge(self.n_cells)
        self._charging = charging
        self._estimate_pending()
        self._publish()

    def _charge_ended(self) -> None:
        """Find each cell's charge segment and keep its features for the model."""
        if self.model is None:
            return
        time_s, current_a, voltage_v, temp_c = self._charge.columns(self.n_cells)
        for c in range(self.n_cells):
            try:
                segment = find_charge_segments(
                    time_s, current_a, voltage_v[:, c], self.cell.capacity_ah,
                    self.cell.voltage_max_v,
                )[-1]  # fmt: skip
            except NoChargeSegment as exc:
                if c == 0:
                    log.info("a charge ended without a segment the model can use: %s", exc)
                continue
            self._features[c] = charge_features(
                time_s, current_a, voltage_v[:, c], temp_c[:, c], segment, self.cell.capacity_ah
            )

    def _estimate_pending(self) -> None:
        """Run the model for cells with fresh features and a known resistance growth."""
        done = 0
        for c, features in enumerate(self._features):
            if features is None:
                continue
            growth = self._online[c].estimate().resistance_growth
            if math.isnan(growth):
                continue  # wait for a current step
            self._features[c] = None
            result = self.model.estimate(features.vector(growth))
            if result.available:
                self._ml_ah[c], self._ml_std_ah[c] = result.capacity_ah, result.capacity_std_ah
                done += 1
        if done:
            log.info("state of health: the model estimated %d cell(s) from a charge", done)

    def _publish(self) -> None:
        estimates = [online.estimate() for online in self._online]
        column = lambda name: np.array([getattr(e, name) for e in estimates])  # noqa: E731
        online_ah, online_std_ah = column("capacity_ah"), column("capacity_std_ah")
        sigma = np.array(
            [
                disagreement_sigma(a, a_std, b, b_std)
                for a, a_std, b, b_std in zip(
                    self._ml_ah, self._ml_std_ah, online_ah, online_std_ah, strict=True
                )
            ]
        )
        self.latest = PackHealth(
            t_s=time.monotonic(),
            capacity_online_ah=online_ah,
            capacity_online_std_ah=online_std_ah,
            capacity_ml_ah=self._ml_ah.copy(),
            capacity_ml_std_ah=self._ml_std_ah.copy(),
            resistance_growth=column("resistance_growth"),
            resistance_growth_std=column("resistance_growth_std"),
            disagree=sigma > CROSS_CHECK_SIGMA,  # False for NaN
            nominal_capacity_ah=self.cell.capacity_ah,
        )
