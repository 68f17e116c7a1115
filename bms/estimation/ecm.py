"""The second-order Thevenin cell model, as Numba kernels over parameter tables.

Terminal voltage ``ocv(soc, T) + v_rc1_v + v_rc2_v + r0(soc, T) * current_a`` (current positive
when charging). The tables are grids over SOC and temperature; lookups interpolate bilinearly and
clamp at the grid's edges, so a cell outside the characterised range gets the nearest measured
parameters rather than an extrapolation. Every function here is pure and compiled with
``cache=True``; the EKF and state-of-power kernels build on them. The small lookups are inlined
by Numba (``inline="always"``): left to LLVM they stay calls, and the EKF ran 1.6x slower.

Numba's cache does not notice when a function this module provides changes under a caller in
another module: after editing this file, delete ``bms/estimation/__pycache__/*.nb?``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

SECONDS_PER_HOUR = 3600.0

R0, R1, C1, R2, C2 = range(5)
"""Column of each parameter in the impedance table's last axis."""


class EcmTables(NamedTuple):
    """Parameter grids of one cell type, in the layout the kernels take.

    ocv_soc: (n_ocv_soc,) rising from 0 to 1; ocv_temp_c: (n_ocv_temp,) rising;
    ocv_v: (n_ocv_temp, n_ocv_soc), rising along SOC.
    imp_soc: (n_imp_soc,); imp_temp_c: (n_imp_temp,);
    impedance: (n_imp_temp, n_imp_soc, 5) with columns r0_ohm, r1_ohm, c1_f, r2_ohm, c2_f.
    """

    ocv_soc: np.ndarray
    ocv_temp_c: np.ndarray
    ocv_v: np.ndarray
    imp_soc: np.ndarray
    imp_temp_c: np.ndarray
    impedance: np.ndarray


@njit(cache=True, inline="always")
def bracket(grid, x):
    """Index ``i`` and weight ``w`` so that x ~ grid[i] * (1 - w) + grid[i + 1] * w, clamped.

    grid: (n,) strictly rising. A single-point grid gives (0, 0.0). NaN clamps to the low end.
    """
    n = grid.shape[0]
    if n == 1 or not x > grid[0]:
        return 0, 0.0
    if x >= grid[n - 1]:
        return n - 2, 1.0
    lo = 0
    hi = n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if grid[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo, (x - grid[lo]) / (grid[lo + 1] - grid[lo])


@njit(cache=True, inline="always")
def at_temperature(grid, temp_c):
    """(lower row, upper row, weight) of ``temp_c`` in a temperature grid, clamped: found
    once per cell and cycle, then used for every lookup at that temperature."""
    i, w = bracket(grid, temp_c)
    return i, min(i + 1, grid.shape[0] - 1), w


@njit(cache=True, inline="always")
def ocv_at(tables, row, soc):
    """Open-circuit voltage (V) and its slope dOCV/dSOC (V per unit SOC) at ``soc`` in the
    OCV table's temperature ``row`` (from :func:`at_temperature`).

    The slope is that of the table segment the SOC falls in, and zero outside the table: the
    EKF then learns nothing about SOC from voltage there, which is the honest answer.
    """
    grid = tables.ocv_soc
    it, jt, wt = row
    i, w = bracket(grid, soc)
    lo = tables.ocv_v[it, i] * (1.0 - wt) + tables.ocv_v[jt, i] * wt
    hi = tables.ocv_v[it, i + 1] * (1.0 - wt) + tables.ocv_v[jt, i + 1] * wt
    inside = grid[0] < soc < grid[grid.shape[0] - 1]
    slope = (hi - lo) / (grid[i + 1] - grid[i]) if inside else 0.0
    return lo + (hi - lo) * w, slope


@njit(cache=True, inline="always")
def _impedance_column(tables, row, i, j, w, k):
    it, jt, wt = row
    table = tables.impedance
    low_t = table[it, i, k] * (1.0 - w) + table[it, j, k] * w
    high_t = table[jt, i, k] * (1.0 - w) + table[jt, j, k] * w
    return low_t * (1.0 - wt) + high_t * wt


@njit(cache=True, inline="always")
def impedance_at(tables, row, soc, out):
    """Write r0_ohm, r1_ohm, c1_f, r2_ohm, c2_f at ``soc`` in the impedance table's
    temperature ``row`` into ``out`` (5,)."""
    it, jt, wt = row
    i, w = bracket(tables.imp_soc, soc)
    j = min(i + 1, tables.imp_soc.shape[0] - 1)
    table = tables.impedance
    for k in range(5):
        low_t = table[it, i, k] * (1.0 - w) + table[it, j, k] * w
        high_t = table[jt, i, k] * (1.0 - w) + table[jt, j, k] * w
        out[k] = low_t * (1.0 - wt) + high_t * wt


@njit(cache=True, inline="always")
def r0_at(tables, row, soc):
    """R0 alone (ohm), where the other four are not needed."""
    i, w = bracket(tables.imp_soc, soc)
    return _impedance_column(tables, row, i, min(i + 1, tables.imp_soc.shape[0] - 1), w, R0)


@njit(cache=True)
def ocv_and_slope(tables, soc, temp_c):
    """:func:`ocv_at` at a temperature in degC."""
    return ocv_at(tables, at_temperature(tables.ocv_temp_c, temp_c), soc)


@njit(cache=True)
def impedance(tables, soc, temp_c, out):
    """:func:`impedance_at` at a temperature in degC."""
    impedance_at(tables, at_temperature(tables.imp_temp_c, temp_c), soc, out)


@njit(cache=True)
def ocvs(tables, soc, temp_c, out):
    """Open-circuit voltages of many cells: soc, temp_c (n,); writes out (n,)."""
    for c in range(soc.shape[0]):
        out[c] = ocv_and_slope(tables, soc[c], temp_c[c])[0]


@njit(cache=True)
def socs_from_ocv(tables, ocv_v, temp_c, out):
    """:func:`soc_from_ocv` for many cells: ocv_v, temp_c (n,); writes out (n,)."""
    for c in range(ocv_v.shape[0]):
        out[c] = soc_from_ocv(tables, ocv_v[c], temp_c[c])


@njit(cache=True)
def impedances(tables, soc, temp_c, out):
    """:func:`impedance` for many cells: soc, temp_c (n,); writes out (n, 5)."""
    for c in range(soc.shape[0]):
        impedance(tables, soc[c], temp_c[c], out[c])


@njit(cache=True)
def soc_from_ocv(tables, ocv_v, temp_c):
    """SOC of a rested cell whose voltage is ``ocv_v`` at ``temp_c``, clamped to the table.

    Inverts the OCV curve at that temperature; NaN in gives NaN out.
    """
    if math.isnan(ocv_v):
        return math.nan
    grid = tables.ocv_soc
    n = grid.shape[0]
    it, jt, wt = at_temperature(tables.ocv_temp_c, temp_c)
    previous_v = tables.ocv_v[it, 0] * (1.0 - wt) + tables.ocv_v[jt, 0] * wt
    if ocv_v <= previous_v:
        return grid[0]
    for i in range(1, n):
        v = tables.ocv_v[it, i] * (1.0 - wt) + tables.ocv_v[jt, i] * wt
        if ocv_v <= v:
            return grid[i - 1] + (grid[i] - grid[i - 1]) * (ocv_v - previous_v) / (v - previous_v)
        previous_v = v
    return grid[n - 1]


EXP_SERIES_BELOW = 0.01
"""Where |dt / RC| is below this, expm1 is its Taylor series to the fifth power (error under
1e-13 relative): a loop step against a time constant of seconds. Twice faster than libm, and
the EKF calls it twice per cell and step."""


@njit(cache=True, inline="always")
def rc_decay(r_ohm, c_f, dt_s):
    """(a, 1 - a) for an RC pair over ``dt_s``: a = exp(-dt / (R C)) is the fraction of its
    voltage left, 1 - a the fraction a held current builds (computed as -expm1, so it keeps
    its digits when dt is small against RC)."""
    x = -dt_s / (r_ohm * c_f)
    if x > -EXP_SERIES_BELOW:
        m1 = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    else:
        m1 = math.expm1(x)
    return 1.0 + m1, -m1


@njit(cache=True, inline="always")
def step_current_a(previous_a, now_a):
    """The current taken as flowing between two samples: their mean (trapezoidal rule).

    Logs and front-ends sample the current at instants; the mean of the two ends is exact for a
    current that ramps between them and splits the difference for a step. A NaN end falls back
    to the other.
    """
    if math.isnan(previous_a):
        return now_a
    if math.isnan(now_a):
        return previous_a
    return 0.5 * (previous_a + now_a)


@njit(cache=True)
def simulate(tables, capacity_ah, soc0, current_a, temp_c, dt_s):
    """Terminal voltage (V) of one cell from rest at ``soc0`` under a current profile.

    current_a, temp_c, dt_s: (n_steps,); dt_s[k] is the time from sample k-1 to k (dt_s[0] is
    ignored: sample 0 is the starting point). Returns (voltage_v, soc), each (n_steps,). Between
    samples the current is the mean of its two ends (see :func:`step_current_a`), and the RC
    pairs are discretised exactly. Used by identification to score a fit and by tests as a
    reference plant.
    """
    n = current_a.shape[0]
    voltage_v = np.empty(n)
    soc_out = np.empty(n)
    z = np.empty(5)
    soc = soc0
    v1 = 0.0
    v2 = 0.0
    for k in range(n):
        if k > 0:
            i_held = step_current_a(current_a[k - 1], current_a[k])
            impedance(tables, soc, temp_c[k - 1], z)
            a1, built1 = rc_decay(z[R1], z[C1], dt_s[k])
            a2, built2 = rc_decay(z[R2], z[C2], dt_s[k])
            v1 = a1 * v1 + z[R1] * built1 * i_held
            v2 = a2 * v2 + z[R2] * built2 * i_held
            soc += i_held * dt_s[k] / (SECONDS_PER_HOUR * capacity_ah)
        impedance(tables, soc, temp_c[k], z)
        ocv, _ = ocv_and_slope(tables, soc, temp_c[k])
        voltage_v[k] = ocv + v1 + v2 + z[R0] * current_a[k]
        soc_out[k] = soc
    return voltage_v, soc_out
