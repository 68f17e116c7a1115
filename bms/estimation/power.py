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

A parameter set with a power test (``power.csv``, see bms/estimation/fitting.py) gives the
overpotential of pulses from rest at a ladder of currents instead, measured at each duration.
Then the limit is where

    ocv(soc + I t / 3600 Q) + sum_k v_k e^(-t/tau_k) ± overpotential(|I|, t; soc, T)

meets the limit: the map interpolated bilinearly over SOC and temperature, and along the
ladder as a power law between neighbours (log-log linear: overpotential grows less than
linearly with current, and a straight line between two points would understate it). The
present polarisation ``v_k`` still decays by the ECM's time constants. No limit is given
beyond the ladder's largest current: the map says nothing there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
    bracket,
    impedance_at,
    ocv_at,
    rc_decay,
)

NEWTON_STEPS = 6
NEWTON_TOLERANCE_V = 1e-4
SAME_IMPEDANCE = 0.01
"""Relative change of every impedance parameter over a pulse below which one solve will do."""
MAP_TOLERANCE = 1e-3
"""Relative width of the bracket at which the power map's root search stops."""
MAP_MAX_STEPS = 40


class PowerMap(NamedTuple):
    """Overpotential of pulses from rest, in the layout the kernel takes.

    soc: (n_soc,) rising; temp_c: (n_temp,) rising; current_a: (n_currents,) rising
    magnitudes > 0; overpotential_v: (n_temp, n_soc, 2, n_currents, n_durations), towards the
    limit (> 0), direction 0 discharge and 1 charge, at the durations of POWER_DURATIONS_S.
    A map without currents (:func:`no_power_map`) means the set has none.
    """

    soc: np.ndarray
    temp_c: np.ndarray
    current_a: np.ndarray
    overpotential_v: np.ndarray


def no_power_map(n_durations: int) -> PowerMap:
    """The empty map of a set without a power test: the ECM's closed form is used."""
    return PowerMap(np.zeros(1), np.zeros(1), np.zeros(0), np.zeros((1, 1, 2, 0, n_durations)))


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


@njit(cache=True, inline="always")
def _ladder_overpotential(ladder_a, eta_v, amps):
    """Overpotential (V) at ``amps`` from its values eta_v (n,) at the ladder's currents
    ladder_a (n,): a power law between neighbours, in proportion to current below the first
    (which understates a curve growing less than linearly a little; the first is small, C/10
    in a power test) and beyond the last (the estimator caps the limit there)."""
    n = ladder_a.shape[0]
    if amps <= ladder_a[0]:
        return eta_v[0] * amps / ladder_a[0]
    if amps >= ladder_a[n - 1]:
        return eta_v[n - 1] * amps / ladder_a[n - 1]
    k, _ = bracket(ladder_a, amps)
    power = math.log(eta_v[k + 1] / eta_v[k]) / math.log(ladder_a[k + 1] / ladder_a[k])
    return eta_v[k] * (amps / ladder_a[k]) ** power


@njit(cache=True, inline="always")
def _map_gap(at, amps):
    """How far past ``target_v`` (V, towards it positive) the voltage is at ``amps``; ``at``:
    (tables, ocv_row, ladder_a, eta_v, soc, soc_per_a, relax_v, target_v, sign)."""
    tables, ocv_row, ladder_a, eta_v, soc, soc_per_a, relax_v, target_v, sign = at
    ocv, _ = ocv_at(tables, ocv_row, soc + sign * amps * soc_per_a)
    return _ladder_overpotential(ladder_a, eta_v, amps) + sign * (ocv + relax_v - target_v)


@njit(cache=True)
def _map_limit(
    tables, ocv_row, pmap, map_row, soc, soc_per_a, relax_v, d, target_v, sign, cap_a, eta_v
):
    """Largest current magnitude in direction ``sign`` (+1 charge, -1 discharge), up to
    ``cap_a``, whose pulse from the map keeps the voltage on the safe side of ``target_v``
    at duration index ``d``; 0 where even no current does.

    map_row: the map's temperature row; relax_v: the present polarisation at the pulse's
    end; soc_per_a: SOC moved per ampere over the pulse; eta_v: (n_currents,) scratch.
    """
    it, jt, wt = map_row
    i, w = bracket(pmap.soc, soc)
    j = min(i + 1, pmap.soc.shape[0] - 1)
    way = 1 if sign > 0.0 else 0
    table = pmap.overpotential_v
    ladder_a = pmap.current_a
    for k in range(ladder_a.shape[0]):
        low_t = table[it, i, way, k, d] * (1.0 - w) + table[it, j, way, k, d] * w
        high_t = table[jt, i, way, k, d] * (1.0 - w) + table[jt, j, way, k, d] * w
        eta_v[k] = low_t * (1.0 - wt) + high_t * wt
    at = (tables, ocv_row, ladder_a, eta_v, soc, soc_per_a, relax_v, target_v, sign)
    lo, gap_lo = 0.0, _map_gap(at, 0.0)
    if not gap_lo < 0.0:  # past the limit already, or NaN: nothing is known to be safe
        return 0.0
    hi, gap_hi = cap_a, _map_gap(at, cap_a)
    if gap_hi < 0.0:
        return cap_a
    below, above = -1, ladder_a.shape[0]  # bisect the ladder for the two currents around it
    while above - below > 1:
        mid_k = (below + above) // 2
        if ladder_a[mid_k] >= cap_a:
            above = mid_k
            continue
        gap = _map_gap(at, ladder_a[mid_k])
        if not gap < 0.0:
            above, hi, gap_hi = mid_k, ladder_a[mid_k], gap
        else:
            below, lo, gap_lo = mid_k, ladder_a[mid_k], gap
    for _ in range(MAP_MAX_STEPS):  # regula falsi, Illinois variant, keeping lo feasible
        if hi - lo <= MAP_TOLERANCE * hi:
            break
        mid = hi - gap_hi * (hi - lo) / (gap_hi - gap_lo)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        gap = _map_gap(at, mid)
        if not gap < 0.0:
            hi, gap_hi = mid, gap
            gap_lo *= 0.5
        else:
            lo, gap_lo = mid, gap
            gap_hi *= 0.5
    return lo


@njit(cache=True, inline="always")
def _map_limits(tables, rows, pmap, soc, soc_per_a, v1, v2, relax_end_v, d, target_v, sign,
                cap_a, eta_v):  # fmt: skip
    """:func:`_map_limit` at the pulse's end, and where the present polarisation pushes
    towards the limit more now than it will then, also at its start (undecayed, with the
    shortest duration's overpotential): the smaller. relax_end_v: what the present
    polarisation v1 + v2 has decayed to by the pulse's end."""
    limit = _map_limit(tables, rows[0], pmap, rows[2], soc, soc_per_a, relax_end_v, d,
                       target_v, sign, cap_a, eta_v)  # fmt: skip
    if sign * (v1 + v2) > sign * relax_end_v:
        at_start = _map_limit(tables, rows[0], pmap, rows[2], soc, 0.0, v1 + v2, 0,
                              target_v, sign, cap_a, eta_v)  # fmt: skip
        limit = min(limit, at_start)
    return limit


@njit(cache=True)
def power_limits(
    tables,
    pmap,
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

    tables, pmap: the fields of EcmTables and PowerMap as plain tuples (a map without
    currents: the ECM's closed form, else the map; see the module). capacity_ah, temp_c: (n_cells,);
    x: (n_cells, 3) EKF state; durations_s: (n_durations,). Updates ``count`` cells from
    ``first`` on (wrapping), so a large pack can spread the work over several cycles; writes
    their rows of charge_limit_a and discharge_limit_a, (n_cells, n_durations). A cell
    already past a limit gets 0 in that direction, and one whose state is not finite 0 in
    both; no limit exceeds ``cap_a``.
    """
    tables = EcmTables(*tables)
    pmap = PowerMap(*pmap)
    measured = pmap.current_a.shape[0] > 0
    work = np.empty(11 + pmap.current_a.shape[0])
    present, z, eta_v = work[0:6], work[6:11], work[11:]
    n_cells = x.shape[0]
    for m in range(min(count, n_cells)):
        c = (first + m) % n_cells
        soc, v1, v2 = x[c, 0], x[c, 1], x[c, 2]
        if not (math.isfinite(soc) and math.isfinite(v1) and math.isfinite(v2)):
            charge_limit_a[c, :] = 0.0  # a state we cannot trust carries no current
            discharge_limit_a[c, :] = 0.0
            continue
        rows = (
            at_temperature(tables.ocv_temp_c, temp_c[c]),
            at_temperature(tables.imp_temp_c, temp_c[c]),
            at_temperature(pmap.temp_c, temp_c[c]),
        )
        impedance_at(tables, rows[1], soc, present[:5])
        present[5] = ocv_at(tables, rows[0], soc)[0]
        for d in range(durations_s.shape[0]):
            duration = durations_s[d]
            if measured:  # the polarisation's decay serves both ways
                a1, _ = rc_decay(present[R1], present[C1], duration)
                a2, _ = rc_decay(present[R2], present[C2], duration)
                relax_end_v = v1 * a1 + v2 * a2
                soc_per_a = duration / (SECONDS_PER_HOUR * capacity_ah[c])
                charge = _map_limits(tables, rows, pmap, soc, soc_per_a, v1, v2, relax_end_v,
                                     d, voltage_max_v, 1.0, cap_a, eta_v)  # fmt: skip
                discharge = _map_limits(tables, rows, pmap, soc, soc_per_a, v1, v2,
                                        relax_end_v, d, voltage_min_v, -1.0, cap_a,
                                        eta_v)  # fmt: skip
                charge_limit_a[c, d] = charge
                discharge_limit_a[c, d] = discharge
                continue  # the map's limits lie in [0, cap_a] already
            charge = _safer_limit(
                tables, rows[:2], soc, capacity_ah[c], v1, v2, present, z, duration,
                voltage_max_v, 1.0,
            )  # fmt: skip
            discharge = _safer_limit(
                tables, rows[:2], soc, capacity_ah[c], v1, v2, present, z, duration,
                voltage_min_v, -1.0,
            )  # fmt: skip
            charge_limit_a[c, d] = min(max(charge, 0.0), cap_a)
            discharge_limit_a[c, d] = min(max(discharge, 0.0), cap_a)
        for d in range(1, durations_s.shape[0]):
            # what a cell cannot carry for 10 s it cannot carry for 30 (the checks at a
            # pulse's start and end alone can miss a polarisation peaking between them)
            charge_limit_a[c, d] = min(charge_limit_a[c, d], charge_limit_a[c, d - 1])
            discharge_limit_a[c, d] = min(discharge_limit_a[c, d], discharge_limit_a[c, d - 1])
