"""The online state-of-health estimator: no ML, only the EKF, a coulomb counter and pulses.

* **Capacity**: the charge counted between two *anchors*, points where the cell had rested
  long enough for the EKF to re-initialise its SOC from the open-circuit voltage and its SOC
  sigma was small (where it is not, the rested voltage through the OCV table gives the SOC),
  divided by the SOC difference between them:
  ``capacity_ah = delta_charge_ah / (soc_b - soc_a)``. Its variance adds the two SOC sigmas
  and the current sensor's gain and offset error over the span; of all anchor pairs at least
  ``MIN_ANCHOR_DSOC`` apart, the one with the smallest relative variance is reported.
* **Resistance growth**: every current step of at least ``MIN_STEP_C_RATE`` out of a rest
  of at least ``MIN_STEP_REST_S`` gives the instantaneous voltage response over the current
  change, ``dv / di``, against what the parameter set's R0 at that SOC and temperature
  predicts, ``di * r0``. A scalar recursive least squares (forgetting factor
  ``RLS_FORGETTING``) fits ``dv = growth * di * r0`` over the steps; its variance is the RLS
  covariance times the residual scatter (at least the voltage noise), plus the parameter
  set's stated impedance error (``impedance_error_ratio``): a table that is 10 % off makes
  every ratio 10 % off, however many steps there are.

Both take samples one at a time (:meth:`OnlineHealth.update`), so the service can feed them
from the loop's newest values at a low rate; :func:`run_log` replays a whole log through the
service's EKF first. Pure computation: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bms.estimation.cell_params import CellParams

SECONDS_PER_HOUR = 3600.0
ANCHOR_REST_S = 1800.0
"""A rest this long before a sample makes it an anchor candidate (the EKF's own
``[soc] rest_time_s`` default: by then it has re-initialised from the OCV)."""
ANCHOR_MAX_SOC_STD = 0.03
"""An anchor's SOC sigma (the EKF's) must be at most this."""
RESTED_VOLTAGE_STD_V = 0.005
"""Where the EKF is not confident at the end of a long rest (its ECM may still carry
polarisation that the cell has lost: a slow RC at the top of charge), the anchor's SOC comes
from the rested voltage through the OCV table instead; this is that voltage's error (sensor
and what relaxation is left, 1 sigma)."""
REST_C_RATE = 0.01
"""Below this C-rate the cell rests (for anchors, steps and the EKF that :func:`run_log`
runs). The service's default ``[soc] rest_current_a`` of 0.5 A is 0.1C for a 5 Ah cell: a CV
tail that slow lasts over 30 min on an aged cell, and the EKF re-initialises from a voltage
that is not at rest."""
OCV_AGEING_SOC_STD = 0.04
"""SOC error of the fresh cell's OCV table on an aged one, at mid SOC (1 sigma): the
electrodes slip against each other as lithium is lost, so the same rested voltage means
another SOC. At the voltage limits it vanishes (SOC 0 and 1 are the limits by definition);
in between it is taken as ``OCV_AGEING_SOC_STD * (1 - |2 soc - 1|)`` and added to the
EKF's sigma, so a pair of anchors at the ends is preferred and a mid-SOC one is honest."""
MIN_ANCHOR_DSOC = 0.4
"""Anchors closer in SOC than this give too uncertain a capacity."""
CURRENT_GAIN_ERROR = 0.005
"""Relative error of the current sensor's gain (1 sigma): adds to the counted charge."""
CURRENT_OFFSET_A = 0.005
"""Offset of the current sensor (1 sigma), integrated over the anchors' span."""
MIN_STEP_C_RATE = 0.2
MIN_STEP_REST_S = 60.0
STEP_SOC_RANGE = (0.1, 0.95)
"""Steps at SOCs outside this range are skipped: the impedance tables are least certain at
their ends and R0 rises steeply there."""
CROSS_CHECK_SIGMA = 2.0
"""Two estimates further apart than this many combined sigmas disagree: a warning."""
RLS_FORGETTING = 0.98
RLS_INITIAL_VARIANCE = 100.0
"""Initial variance of the growth ratio, in units of the first regressor's inverse square:
a prior that says nothing."""


@dataclass(frozen=True)
class OnlineEstimate:
    """What the online estimator knows; NaN where it has too little data yet.

    ``capacity_ah`` and ``capacity_std_ah`` (1 sigma); ``resistance_growth`` (ratio of the
    measured instantaneous resistance to the parameter set's R0 at the same SOC and
    temperature) and ``resistance_growth_std``; ``anchors`` and ``steps`` used."""

    capacity_ah: float
    capacity_std_ah: float
    resistance_growth: float
    resistance_growth_std: float
    anchors: int
    steps: int


@dataclass
class _Anchor:
    charge_ah: float
    elapsed_s: float
    soc: float
    soc_std: float


@dataclass
class OnlineHealth:
    """Streaming capacity and resistance estimator for one cell of type ``cell``."""

    cell: CellParams
    voltage_noise_v: float = 0.002
    _charge_ah: float = 0.0
    _elapsed_s: float = 0.0
    _rest_s: float = 0.0
    _previous: tuple[float, float, float, float, float] | None = None
    _candidate: _Anchor | None = None
    _anchors: list[_Anchor] = field(default_factory=list)
    _theta: float = math.nan
    _p: float = math.nan
    _residuals: list[float] = field(default_factory=list)
    _steps: int = 0

    def update(
        self,
        t_s: float,
        current_a: float,
        voltage_v: float,
        temp_c: float,
        soc: float,
        soc_std: float,
    ) -> None:
        """One sample: current (A, positive charging), voltage (V), temperature (degC) and
        the EKF's SOC and its sigma at that sample. A sample with any NaN is skipped (and the
        time it covers counts as not at rest)."""
        values = (t_s, current_a, voltage_v, temp_c, soc)
        if any(math.isnan(v) for v in values):
            self._previous = None
            self._rest_s = 0.0
            self._commit_candidate()
            return
        rest_a = self.cell.capacity_ah * REST_C_RATE
        if self._previous is not None:
            t0, i0, v0, _, soc0 = self._previous
            dt_s = t_s - t0
            self._charge_ah += i0 * dt_s / SECONDS_PER_HOUR
            self._elapsed_s += dt_s
            if abs(i0) <= rest_a:
                self._rest_s += dt_s
            if abs(current_a - i0) >= MIN_STEP_C_RATE * self.cell.capacity_ah:
                self._step(i0, v0, soc0, current_a, voltage_v, temp_c)
        at_rest = abs(current_a) <= rest_a
        if not at_rest:
            self._rest_s = 0.0
            self._commit_candidate()
        elif self._rest_s >= ANCHOR_REST_S:
            # the latest sample of a rest is its best: the most relaxed
            if soc_std > ANCHOR_MAX_SOC_STD:
                soc, soc_std = self._rested_soc(voltage_v, temp_c)
            ocv_std = OCV_AGEING_SOC_STD * (1.0 - abs(2.0 * soc - 1.0))
            self._candidate = _Anchor(
                self._charge_ah, self._elapsed_s, soc, math.hypot(soc_std, ocv_std)
            )
        self._previous = (t_s, current_a, voltage_v, temp_c, soc)

    def _rested_soc(self, voltage_v: float, temp_c: float) -> tuple[float, float]:
        """SOC of a long-rested cell from its voltage and the OCV table, with the sigma that
        RESTED_VOLTAGE_STD_V gives through the table's slope there."""
        soc = float(self.cell.soc_at_ocv(np.array([voltage_v]), temp_c)[0])
        low, high = max(soc - 0.005, 0.0), min(soc + 0.005, 1.0)
        ocv = self.cell.ocv_at(np.array([low, high]), temp_c)
        slope = (ocv[1] - ocv[0]) / (high - low)
        return soc, RESTED_VOLTAGE_STD_V / slope

    def _commit_candidate(self) -> None:
        if self._candidate is not None:
            self._anchors.append(self._candidate)
            self._candidate = None

    def _step(self, i0, v0, soc0, i1, v1, temp_c) -> None:
        """A current step from i0 (at rest, SOC soc0) to i1: one RLS update."""
        if self._rest_s < MIN_STEP_REST_S or not STEP_SOC_RANGE[0] <= soc0 <= STEP_SOC_RANGE[1]:
            return
        r0_ohm = self.cell.impedance_at(soc0, temp_c)["r0_ohm"]
        x = (i1 - i0) * r0_ohm
        y = v1 - v0
        if math.isnan(self._theta):
            self._theta, self._p = 0.0, RLS_INITIAL_VARIANCE / x**2
        gain = self._p * x / (RLS_FORGETTING + x * self._p * x)
        residual = y - x * self._theta
        self._theta += gain * residual
        self._p = (self._p - gain * x * self._p) / RLS_FORGETTING
        self._residuals.append(y - x * self._theta)
        self._steps += 1

    def estimate(self) -> OnlineEstimate:
        """The newest estimate (a rest still going on counts as its anchor)."""
        anchors = [*self._anchors, *([self._candidate] if self._candidate else [])]
        capacity_ah, capacity_std_ah = _best_capacity(anchors)
        if self._steps:
            scatter = np.sqrt(np.mean(np.square(self._residuals))) if self._steps > 2 else 0.0
            noise_v = max(float(scatter), math.sqrt(2.0) * self.voltage_noise_v)
            # the statistical part, and the tables' own error, which no number of steps
            # averages away (the parameter set's impedance_error_ratio)
            growth = self._theta
            growth_std = math.hypot(
                math.sqrt(self._p) * noise_v, self.cell.tuning.impedance_error_ratio * growth
            )
        else:
            growth = growth_std = math.nan
        return OnlineEstimate(
            capacity_ah, capacity_std_ah, growth, growth_std, len(anchors), self._steps
        )


def _best_capacity(anchors: list[_Anchor]) -> tuple[float, float]:
    """Of all pairs far enough apart, the capacity with the smallest *relative* variance
    (an absolute one would favour whichever pair happens to give the smaller capacity)."""
    best, best_rel = (math.nan, math.nan), math.inf
    for k, a in enumerate(anchors):
        for b in anchors[k + 1 :]:
            dsoc = b.soc - a.soc
            if abs(dsoc) < MIN_ANCHOR_DSOC:
                continue
            dq_ah = b.charge_ah - a.charge_ah
            capacity_ah = dq_ah / dsoc
            charge_var = (CURRENT_GAIN_ERROR * dq_ah) ** 2 + (
                CURRENT_OFFSET_A * (b.elapsed_s - a.elapsed_s) / SECONDS_PER_HOUR
            ) ** 2
            var = (capacity_ah**2 * (a.soc_std**2 + b.soc_std**2) + charge_var) / dsoc**2
            if capacity_ah > 0.0 and var / capacity_ah**2 < best_rel:
                best, best_rel = (capacity_ah, math.sqrt(var)), var / capacity_ah**2
    return best


def disagreement_sigma(a: float, a_std: float, b: float, b_std: float) -> float:
    """How many combined sigmas two independent estimates are apart (NaN if either is
    unknown); above CROSS_CHECK_SIGMA they disagree."""
    return abs(a - b) / math.hypot(a_std, b_std)


def run_log(cell: CellParams, log: dict[str, np.ndarray]) -> tuple[OnlineEstimate, dict]:
    """Replay ``log`` (columns time_s, current_a, voltage_v, temp_c) through the service's
    EKF (resting below REST_C_RATE for ANCHOR_REST_S), then through :class:`OnlineHealth`.
    Returns the estimate and the EKF's SOC and SOC
    sigma per row (``{"soc": (n,), "soc_std": (n,)}``)."""
    from bms.config import SocConfig
    from bms.replay import replay

    soc_config = SocConfig(rest_current_a=REST_C_RATE * cell.capacity_ah, rest_time_s=ANCHOR_REST_S)
    result = replay(cell, log, soc_config=soc_config)
    health = OnlineHealth(cell)
    for k in range(log["time_s"].size):
        health.update(
            float(log["time_s"][k]),
            float(log["current_a"][k]),
            float(log["voltage_v"][k]),
            float(log["temp_c"][k]),
            float(result.soc[k]),
            float(result.soc_std[k]),
        )
    return health.estimate(), {"soc": result.soc, "soc_std": result.soc_std}
