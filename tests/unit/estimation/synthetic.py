"""Characterisation tests of a known cell, made with the ECM itself: identification must give
back the parameters it was made with."""

from __future__ import annotations

import numpy as np

from bms.estimation import ecm
from bms.estimation.cell_params import CellParams
from bms.estimation.ecm import SECONDS_PER_HOUR
from bms.estimation.fitting import TestData


def profile(steps: list[tuple[float, float]], dt_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-constant current from (duration_s, current_a) steps, sampled every dt_s; each
    step's samples start one dt into it (the sample on a boundary belongs to the old step)."""
    times, currents = [0.0], [0.0]
    for duration_s, current_a in steps:
        n = max(round(duration_s / dt_s), 1)
        times.extend(times[-1] + dt_s * np.arange(1, n + 1))
        currents.extend([current_a] * n)
    return np.array(times), np.array(currents)


def run(cell: CellParams, name: str, soc0: float, time_s, current_a, temp_c) -> TestData:
    dt_s = np.concatenate(([0.0], np.diff(time_s)))
    temps = np.full(time_s.size, float(temp_c))
    voltage_v, _ = ecm.simulate(cell.tables, cell.capacity_ah, soc0, current_a, temps, dt_s)
    return TestData(name, time_s, current_a, voltage_v, temps)


def ocv_test(cell: CellParams, temp_c: float = 25.0) -> TestData:
    """C/20 from full to empty, 1 h rest, C/20 back to full, sampled every 60 s."""
    c20_a = cell.capacity_ah / 20
    steps = [(600, 0.0), (20 * 3600, -c20_a), (3600, 0.0), (20 * 3600, c20_a), (600, 0.0)]
    return run(cell, "ocv", 1.0, *profile(steps, 60.0), temp_c)


def hppc_test(
    cell: CellParams, temp_c: float, dt_s: float = 1.0, fast_c_rates: tuple[float, ...] = ()
) -> TestData:
    """From full: at every 10 % of SOC, a 1C 30 s discharge pulse, 10 min rest, 0.75C 30 s
    charge pulse, 10 min rest, then 10 % of capacity at C/2 and 1 h rest. ``fast_c_rates``:
    a symmetric 30 s pulse pair at each of these rates, each pulse followed by 10 min rest,
    before the 1C pair at every level (a test made for state of power, not for the EKF)."""
    one_c = cell.capacity_ah
    steps = [(600, 0.0)]
    for _ in range(9):
        for rate in fast_c_rates:
            steps += [(30, -rate * one_c), (600, 0.0), (30, rate * one_c), (600, 0.0)]
        steps += [(30, -one_c), (600, 0.0), (30, 0.75 * one_c), (600, 0.0)]
        steps += [(720, -0.5 * one_c), (3600, 0.0)]
    return run(cell, f"hppc_{temp_c:g}C", 1.0, *profile(steps, dt_s), temp_c)


def power_test(
    cell: CellParams,
    temp_c: float,
    levels: tuple[float, ...],
    currents_a: tuple[float, ...],
    dt_s: float = 0.5,
    rest_s: float = 4 * 3600.0,
) -> TestData:
    """From full: at each SOC level, for each current and each way, a pulse of 32 s (or
    until the voltage limit, at least one sample), 300 s rest, the charge put back at 1 A,
    ``rest_s`` of rest;
    C/2 to the next level and 1 h rest. Each pulse's cut-off is found by simulating it alone
    from rest at its level, which the long rests make it (the default is 24 times the
    generic set's slow time constant)."""
    steps = [(600, 0.0)]
    soc = 1.0
    for level in levels:
        steps += [((soc - level) * 2 * SECONDS_PER_HOUR, -0.5 * cell.capacity_ah), (3600, 0.0)]
        soc = level
        for amps in currents_a:
            for sign in (-1.0, 1.0):
                held_s = max(_held_s(cell, level, sign * amps, temp_c, 32.0, dt_s), dt_s)
                steps += [(held_s, sign * amps), (300, 0.0)]
                steps += [(amps * held_s, -sign * 1.0), (rest_s, 0.0)]
    return run(cell, f"power_{temp_c:g}C", 1.0, *profile(steps, dt_s), temp_c)


def _held_s(cell, soc0, current_a, temp_c, duration_s, dt_s) -> float:
    """How long a pulse from rest stays within the cell's voltage limits (up to duration_s)."""
    time_s, current = profile([(duration_s, current_a)], dt_s)
    dt = np.concatenate(([0.0], np.diff(time_s)))
    voltage_v, _ = ecm.simulate(
        cell.tables, cell.capacity_ah, soc0, current, np.full(time_s.size, temp_c), dt
    )
    outside = np.flatnonzero(
        (voltage_v[1:] < cell.voltage_min_v) | (voltage_v[1:] > cell.voltage_max_v)
    )
    return duration_s if outside.size == 0 else float(time_s[1 + outside[0]] - dt_s)
