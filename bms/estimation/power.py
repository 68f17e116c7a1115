"""State of power: the largest constant current each cell can carry for a while.

For a constant current ``I`` held ``t`` seconds from the present state, the ECM gives the
terminal voltage in closed form::

    V(I, t) = ocv(soc + I t / 3600 Q) + sum_k [v_k e^(-t/tau_k) + R_k I (1 - e^(-t/tau_k))] + R0 I

V rises monotonically with I, so the limit is the root of V = voltage_max_v (charge) or
V = voltage_min_v (discharge), found by Newton's method on the piecewise-linear OCV. The
voltage is checked at the start of the pulse (where only R0 acts, at the present SOC) and at
its end, and the tighter of the two is the limit. The closed form holds the impedance fixed
over the pulse, but it changes with SOC (resistance rises towards empty; a fitted time
constant may jump between table points), so the limit is solved with the impedance at the
present SOC and again at the SOC the pulse ends at, and the smaller of the two is taken.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from bms.estimation.ecm import (
    C1,
    C2,
    R0,
    R1,
    R2,
    SECONDS_PER_HOUR,
    EcmTables,
    at_temperature,
    impedance_at,
    ocv_at,
    rc_decay,
)

NEWTON_STEPS = 6
NEWTON_TOLERANCE_V = 1e-4
SAME_IMPEDANCE = 0.01
"""Relative change of every impedance parameter over a pulse below which one solve will do."""


@njit(cache=True)
def _limit_at(
    tables, rows, soc, capacity_ah, v1, v2, present, z, duration_s, target_v, direction, moves
):
    """Largest current magnitude in ``direction`` (+1 charge, -1 discharge) that keeps the
    voltage on the safe side of ``target_v`` at the start and at the end of ``duration_s``.
    Negative when even zero current crosses it.

    rows: the (OCV, impedance) temperature rows; present: (6,) the impedance (5) and OCV at
    the present SOC, found once per cell and reused by every duration and direction;
    z: (5,) scratch space. moves: take the impedance at the SOC the pulse ends at (else the
    present one) for the whole pulse.
    """
    ocv_row, imp_row = rows
    soc_per_a = duration_s / (SECONDS_PER_HOUR * capacity_ah)
    z[:] = present[:5]
    current = 0.0
    for step in range(NEWTON_STEPS):
        soc_end = soc + current * soc_per_a
        if moves and step > 0:
            impedance_at(tables, imp_row, soc_end, z)
        ocv, slope = ocv_at(tables, ocv_row, soc_end)
        a1, built1 = rc_decay(z[R1], z[C1], duration_s)
        a2, built2 = rc_decay(z[R2], z[C2], duration_s)
        gain_ohm = z[R0] + z[R1] * built1 + z[R2] * built2
        error_v = ocv + v1 * a1 + v2 * a2 + gain_ohm * current - target_v
        if abs(error_v) < NEWTON_TOLERANCE_V:
            break
        current -= error_v / (gain_ohm + slope * soc_per_a)
    at_start = (target_v - present[5] - v1 - v2) / present[R0]
    return min(direction * current, direction * at_start)


@njit(cache=True, inline="always")
def _safer_limit(tables, rows, soc, capacity_ah, v1, v2, present, z, duration_s, target_v, sign):
    """:func:`_limit_at` with the impedance of the SOC the pulse ends at, and again with the
    present one where the two differ by more than SAME_IMPEDANCE: the smaller limit."""
    moving = _limit_at(
        tables, rows, soc, capacity_ah, v1, v2, present, z, duration_s, target_v, sign, True
    )
    for k in range(5):  # z now holds the end's impedance
        if abs(z[k] - present[k]) > SAME_IMPEDANCE * present[k]:
            fixed = _limit_at(
                tables,
                rows,
                soc,
                capacity_ah,
                v1,
                v2,
                present,
                z,
                duration_s,
                target_v,
                sign,
                False,
            )
            return min(moving, fixed)
    return moving


@njit(cache=True)
def power_limits(
    tables,
    capacity_ah,
    x,
    temp_c,
    voltage_min_v,
    voltage_max_v,
    cap_a,
    durations_s,
    first,
    count,
    charge_limit_a,
    discharge_limit_a,
):
    """Largest constant charge and discharge current (A, positive magnitudes) per cell and
    duration that keeps the terminal voltage within [voltage_min_v, voltage_max_v].

    tables: the fields of EcmTables as a plain tuple. capacity_ah, temp_c: (n_cells,);
    x: (n_cells, 3) EKF state; durations_s: (n_durations,). Updates ``count`` cells from
    ``first`` on (wrapping), so a large pack can spread the work over several cycles; writes
    their rows of charge_limit_a and discharge_limit_a, (n_cells, n_durations). A cell
    already past a limit gets 0 in that direction; no limit exceeds ``cap_a``.
    """
    tables = EcmTables(*tables)
    work = np.empty(11)
    present, z = work[0:6], work[6:11]
    n_cells = x.shape[0]
    for m in range(min(count, n_cells)):
        c = (first + m) % n_cells
        soc, v1, v2 = x[c, 0], x[c, 1], x[c, 2]
        rows = (
            at_temperature(tables.ocv_temp_c, temp_c[c]),
            at_temperature(tables.imp_temp_c, temp_c[c]),
        )
        impedance_at(tables, rows[1], soc, present[:5])
        present[5] = ocv_at(tables, rows[0], soc)[0]
        for d in range(durations_s.shape[0]):
            duration = durations_s[d]
            charge = _safer_limit(
                tables, rows, soc, capacity_ah[c], v1, v2, present, z, duration,
                voltage_max_v, 1.0,
            )  # fmt: skip
            discharge = _safer_limit(
                tables, rows, soc, capacity_ah[c], v1, v2, present, z, duration,
                voltage_min_v, -1.0,
            )  # fmt: skip
            charge_limit_a[c, d] = min(max(charge, 0.0), cap_a)
            discharge_limit_a[c, d] = min(max(discharge, 0.0), cap_a)
