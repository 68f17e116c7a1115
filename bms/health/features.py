"""Features of a cell's health that a BMS computes on the board from an ordinary charge.

The one feature module: the training pipeline (models/soh/dataset.py) and the run time
(bms/health/runner.py, ``bms health``) both build the model's input here, so the two cannot
drift. Pure numpy over arrays of samples (time_s, current_a positive charging, voltage_v,
temp_c, each (n,)); no I/O, no clock.

A qualifying charge segment is a constant-current charge of at least ``MIN_CHARGE_C_RATE``
that rises from below ``WINDOW_LOW_V`` through ``WINDOW_HIGH_V`` and ends in a
constant-voltage phase at the upper limit that tapers below ``CV_END_C_RATE``. From it:

* ``charge_c_rate``: the CC current over the nominal capacity;
* ``temp_c``: the mean temperature over the segment;
* ``dq_low``, ``dq_high``: charge between voltage points on the CC curve (3.80-3.95 V,
  3.95-4.10 V) over the nominal capacity: they shrink with the capacity;
* ``ic_peak_v``, ``ic_peak``: the position (V) and height (per V, over the nominal
  capacity) of the largest incremental-capacity dQ/dV peak between 3.55 and 4.10 V;
* ``cv_charge``: the charge of the CV phase over the nominal capacity; ``cv_time_h`` its
  length: both grow with the cell's resistance and slower diffusion;
* ``resistance_growth``: not from the segment: the online estimator's pulse resistance over the
  parameter set's (bms/health/online.py), passed in.

Charge throughput and the cycle count are not model inputs (see models/soh/README.md: the
training data's cycles are accelerated ones, so a model that learned them would learn the
acceleration, not the cell).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SECONDS_PER_HOUR = 3600.0
MIN_CHARGE_C_RATE = 0.2
"""A charge slower than this (C-rate) is not a segment (trickle, balancing, regen)."""
CV_END_C_RATE = 0.1
"""The CV phase must taper below this C-rate for the segment to count as complete."""
CHARGING_C_RATE = 0.02
"""A segment lasts while at least this much charge current flows (the CV tail included)."""
CV_BAND_V = 0.01
"""Within this of the upper voltage limit the charger is holding the voltage."""
WINDOW_LOW_V = 3.80
WINDOW_MID_V = 3.95
WINDOW_HIGH_V = 4.10
IC_LOW_V = 3.55
IC_STEP_V = 0.005
IC_SMOOTH_V = 0.04
"""Incremental capacity: Q(V) on a 5 mV grid, differentiated over +-20 mV (noise of a few mV
in the voltage otherwise makes dQ/dV meaningless)."""
MIN_GAP_S = 120.0
"""A gap longer than this between samples ends the segment: its charge is unknown."""

FEATURE_NAMES = (
    "charge_c_rate",
    "temp_c",
    "dq_low",
    "dq_high",
    "ic_peak_v",
    "ic_peak",
    "cv_charge",
    "cv_time_h",
    "resistance_growth",
)


class NoChargeSegment(ValueError):
    """The samples hold no qualifying charge segment; the message says what is missing."""


@dataclass(frozen=True)
class ChargeSegment:
    """Index range of one complete charge in the log: ``start`` (first charging sample),
    ``cv_start`` (first sample of the CV phase), ``stop`` (exclusive)."""

    start: int
    cv_start: int
    stop: int


@dataclass(frozen=True)
class ChargeFeatures:
    """The segment's features (see the module docstring); ``t_s`` is the time of its end."""

    t_s: float
    charge_c_rate: float
    temp_c: float
    dq_low: float
    dq_high: float
    ic_peak_v: float
    ic_peak: float
    cv_charge: float
    cv_time_h: float

    def vector(self, resistance_growth: float) -> np.ndarray:
        """The model input in FEATURE_NAMES order, (n_features,) float64."""
        values = [getattr(self, name) for name in FEATURE_NAMES[:-1]]
        return np.array([*values, resistance_growth], dtype=np.float64)


def _charge_ah(time_s: np.ndarray, current_a: np.ndarray) -> np.ndarray:
    """Charge since the first sample (Ah, (n,)), each row's current held until the next row
    (a log row's current is the one applied from its time on)."""
    steps = current_a[:-1] * np.diff(time_s)
    return np.concatenate(([0.0], np.cumsum(steps))) / SECONDS_PER_HOUR


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def find_charge_segments(
    time_s: np.ndarray,
    current_a: np.ndarray,
    voltage_v: np.ndarray,
    capacity_ah: float,
    voltage_max_v: float,
) -> list[ChargeSegment]:
    """Every qualifying charge segment, in time order; raises NoChargeSegment naming what the
    best candidate lacked when there is none."""
    # a sample after a gap starts no run and continues none: the charge across it is unknown
    continuing = np.concatenate(([True], np.diff(time_s) <= MIN_GAP_S))
    segments, problems = [], []
    for start, stop in _runs((current_a >= CHARGING_C_RATE * capacity_ah) & continuing):
        current = current_a[start:stop]
        voltage = voltage_v[start:stop]
        cc = current >= MIN_CHARGE_C_RATE * capacity_ah
        if not cc.any():
            problems.append(f"a charge below {MIN_CHARGE_C_RATE:.1f}C")
            continue
        in_cv = voltage >= voltage_max_v - CV_BAND_V
        if not in_cv.any():
            problems.append(f"a charge that never reached {voltage_max_v:.2f} V (no CV phase)")
            continue
        cv_start = int(np.flatnonzero(in_cv)[0])
        if voltage[: max(cv_start, 1)].min() > WINDOW_LOW_V:
            problems.append(
                f"a charge that started above {WINDOW_LOW_V:.2f} V (it must rise through "
                f"{WINDOW_LOW_V:.2f}-{WINDOW_HIGH_V:.2f} V at constant current)"
            )
            continue
        if current[cv_start:].min() > CV_END_C_RATE * capacity_ah:
            problems.append(
                f"a CV phase that ended before the current fell below {CV_END_C_RATE:.1f}C"
            )
            continue
        segments.append(ChargeSegment(int(start), int(start + cv_start), int(stop)))
    if not segments:
        found = "; found " + ", ".join(dict.fromkeys(problems)) if problems else ""
        raise NoChargeSegment(
            "no usable charge segment: needs a constant-current charge of at least "
            f"{MIN_CHARGE_C_RATE:.1f}C rising from below {WINDOW_LOW_V:.2f} V through "
            f"{WINDOW_HIGH_V:.2f} V, then a constant-voltage phase at {voltage_max_v:.2f} V "
            f"tapering below {CV_END_C_RATE:.1f}C" + found
        )
    return segments


def charge_features(
    time_s: np.ndarray,
    current_a: np.ndarray,
    voltage_v: np.ndarray,
    temp_c: np.ndarray,
    segment: ChargeSegment,
    capacity_ah: float,
) -> ChargeFeatures:
    """The features of one segment (found by :func:`find_charge_segments`); ``capacity_ah``
    is the parameter set's nominal capacity, which every charge is normalised by."""
    cc = slice(segment.start, segment.cv_start)
    q_ah = _charge_ah(time_s[segment.start : segment.stop], current_a[segment.start : segment.stop])
    q_cc = q_ah[: segment.cv_start - segment.start]
    # Q as a function of V on the CC curve: noise makes V dither, the running maximum keeps
    # the first time each voltage was reached
    v_cc = np.maximum.accumulate(voltage_v[cc])
    grid_v = np.arange(IC_LOW_V, WINDOW_HIGH_V + IC_STEP_V / 2, IC_STEP_V)
    q_at = np.interp(grid_v, v_cc, q_cc, left=np.nan, right=np.nan)
    half = round(IC_SMOOTH_V / 2 / IC_STEP_V)
    dq_dv = (q_at[2 * half :] - q_at[: -2 * half]) / (2 * half * IC_STEP_V)
    centre_v = grid_v[half:-half]
    if np.all(np.isnan(dq_dv)):
        ic_peak_v, ic_peak = float("nan"), float("nan")
    else:
        peak = int(np.nanargmax(dq_dv))
        ic_peak_v, ic_peak = float(centre_v[peak]), float(dq_dv[peak] / capacity_ah)

    def q_at_v(level_v: float) -> float:
        return float(np.interp(level_v, v_cc, q_cc))

    cv_q = q_ah[-1] - q_ah[segment.cv_start - segment.start]
    return ChargeFeatures(
        t_s=float(time_s[segment.stop - 1]),
        charge_c_rate=float(np.median(current_a[cc])) / capacity_ah,
        temp_c=float(np.mean(temp_c[segment.start : segment.stop])),
        dq_low=(q_at_v(WINDOW_MID_V) - q_at_v(WINDOW_LOW_V)) / capacity_ah,
        dq_high=(q_at_v(WINDOW_HIGH_V) - q_at_v(WINDOW_MID_V)) / capacity_ah,
        ic_peak_v=ic_peak_v,
        ic_peak=ic_peak,
        cv_charge=float(cv_q) / capacity_ah,
        cv_time_h=float(time_s[segment.stop - 1] - time_s[segment.cv_start]) / SECONDS_PER_HOUR,
    )
