"""Charge-segment features against a charge built by hand: a CC charge along a piecewise-linear
V(Q) curve (so every crossing and dQ/dV is known in closed form), then a CV phase whose
current decays exponentially."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from bms.health.features import (
    FEATURE_NAMES,
    NoChargeSegment,
    charge_features,
    find_charge_segments,
)

CAPACITY_AH = 5.0
V_MAX = 4.2
DT_S = 10.0
CC_A = 5.0
CV_TAU_S = 900.0
# V(Q) during the CC charge, Q in Ah since its start: a plateau 3.70-3.78 V over 1 Ah
# (dQ/dV = 12.5 Ah/V, the steepest part), elsewhere 3-6 Ah/V
CURVE_Q_AH = (0.0, 1.0, 2.0, 3.0, 3.5, 3.8)
CURVE_V = (3.50, 3.70, 3.78, 3.95, 4.10, 4.20)


def charge_log(
    start_q_ah: float = 0.0,
    cv: bool = True,
    cv_end_a: float = 0.25,
    cc_a: float = CC_A,
    gap_at_s: float | None = None,
    stop_v: float = V_MAX,
) -> dict[str, np.ndarray]:
    """Rest 10 min, CC along the curve from ``start_q_ah`` to ``stop_v``, CV at 4.2 V until
    the current falls below ``cv_end_a`` (or none), rest 10 min; 10 s samples."""
    t, i, v = [], [], []
    now = 0.0

    def add(current_a, voltage_v):
        nonlocal now
        t.append(now)
        i.append(current_a)
        v.append(voltage_v)
        now += DT_S

    rest_v = float(np.interp(start_q_ah, CURVE_Q_AH, CURVE_V)) - 0.05
    for _ in range(60):
        add(0.0, rest_v)
    q = start_q_ah
    while q < CURVE_Q_AH[-1] and np.interp(q, CURVE_Q_AH, CURVE_V) < stop_v:
        add(cc_a, float(np.interp(q, CURVE_Q_AH, CURVE_V)))
        q += cc_a * DT_S / 3600.0
    if cv:
        k = 0
        while (current := cc_a * math.exp(-k * DT_S / CV_TAU_S)) >= cv_end_a:
            add(current, V_MAX)
            k += 1
    for _ in range(60):
        add(0.0, V_MAX - 0.05)
    log = {
        "time_s": np.array(t),
        "current_a": np.array(i),
        "voltage_v": np.array(v),
        "temp_c": np.full(len(t), 25.0),
    }
    if gap_at_s is not None:
        late = log["time_s"] > gap_at_s
        log["time_s"] = log["time_s"] + np.where(late, 1000.0, 0.0)
    return log


def features_of(log):
    segments = find_charge_segments(
        log["time_s"], log["current_a"], log["voltage_v"], CAPACITY_AH, V_MAX
    )
    return segments, charge_features(
        log["time_s"], log["current_a"], log["voltage_v"], log["temp_c"], segments[-1], CAPACITY_AH
    )


def test_charge_between_voltage_points_and_the_cv_phase():
    segments, f = features_of(charge_log())
    assert len(segments) == 1
    assert f.charge_c_rate == pytest.approx(1.0)
    assert f.temp_c == pytest.approx(25.0)
    # 3.80 V is crossed 0.02/0.17 of the way from Q = 2.0 to 3.0 Ah; 3.95 V at 3.0; 4.10 at 3.5
    assert f.dq_low == pytest.approx((3.0 - (2.0 + 0.02 / 0.17)) / CAPACITY_AH, abs=0.004)
    assert f.dq_high == pytest.approx(0.5 / CAPACITY_AH, abs=0.004)
    # the plateau: 1 Ah over 80 mV
    assert 3.715 <= f.ic_peak_v <= 3.765
    assert f.ic_peak == pytest.approx(12.5 / CAPACITY_AH, rel=0.03)
    # CV: 5 A decaying with tau 900 s until below 0.25 A, i.e. for 900 ln 20 s; the CV band
    # (10 mV below the limit) starts on the CC curve at Q = 3.5 + 0.09 / (0.1 / 0.3) = 3.77 Ah,
    # so the last 0.03 Ah of constant current count as CV
    cv_s = CV_TAU_S * math.log(CC_A / 0.25)
    cv_ah = CC_A * CV_TAU_S * (1 - 0.25 / CC_A) / 3600 + 0.03
    assert f.cv_charge == pytest.approx(cv_ah / CAPACITY_AH, abs=0.003)
    assert f.cv_time_h == pytest.approx((cv_s + 0.03 * 3600 / CC_A) / 3600, abs=30 / 3600)


def test_a_partial_charge_from_mid_soc_gives_the_same_window_features():
    _, full = features_of(charge_log())
    _, partial = features_of(charge_log(start_q_ah=1.9))
    assert partial.dq_low == pytest.approx(full.dq_low, abs=0.004)
    assert partial.dq_high == pytest.approx(full.dq_high, abs=0.004)
    assert partial.cv_charge == pytest.approx(full.cv_charge, abs=0.004)


def test_the_feature_vector_follows_feature_names_and_ends_with_resistance():
    _, f = features_of(charge_log())
    vector = f.vector(1.25)
    assert vector.shape == (len(FEATURE_NAMES),)
    assert FEATURE_NAMES[-1] == "resistance_growth" and vector[-1] == 1.25
    assert vector[FEATURE_NAMES.index("dq_high")] == f.dq_high


@pytest.mark.parametrize(
    ("log", "missing"),
    [
        (charge_log(cv=False, stop_v=4.1), "never reached 4.20 V"),
        (charge_log(cv=False), "before the current fell below 0.1C"),
        (charge_log(start_q_ah=2.9), "started above 3.80 V"),
        (charge_log(cv_end_a=1.0), "before the current fell below 0.1C"),
        (charge_log(cc_a=0.5), "a charge below 0.2C"),
    ],
)
def test_an_incomplete_charge_is_refused_with_what_it_lacks(log, missing):
    with pytest.raises(NoChargeSegment, match="no usable charge segment") as info:
        features_of(log)
    assert missing in str(info.value)


def test_a_log_without_any_charge_says_what_it_needs():
    log = charge_log()
    log["current_a"] = -np.abs(log["current_a"])
    needs = re.escape("constant-current charge of at least 0.2C")
    with pytest.raises(NoChargeSegment, match=needs):
        features_of(log)


def test_a_gap_in_the_log_splits_the_charge():
    # a 1000 s hole in the middle of the CC phase: neither half is a complete charge
    with pytest.raises(NoChargeSegment):
        features_of(charge_log(gap_at_s=600.0 + 1800.0))


def test_two_charges_are_two_segments_and_the_newest_is_last():
    first, second = charge_log(), charge_log(cc_a=2.5)
    log = {
        name: np.concatenate(
            [first[name], second[name] + (first["time_s"][-1] + DT_S if name == "time_s" else 0)]
        )
        for name in first
    }
    segments, f = features_of(log)
    assert len(segments) == 2
    assert segments[0].stop <= segments[1].start
    assert f.charge_c_rate == pytest.approx(0.5)
