"""Parameter identification from characterisation tests: an OCV test and HPPC pulse tests.

Pure functions over arrays (the ``bms identify`` command reads and writes the files).

* **OCV test** (a slow, C/20-ish discharge from full to empty, a rest, and a charge back):
  the capacity is the charge the discharge removed, and it defines SOC: 1 rested at the upper
  voltage limit, 0 at the lower. The OCV curve is the mean of the discharge and the charge
  curves at each SOC, which cancels their (nearly equal and opposite) resistive drop and most
  of the hysteresis.
* **HPPC test** (at each SOC step: pulses, rests, then a partial discharge to the next step):
  from each discharge pulse to the next, the voltage (pulses, rests, the step to the next SOC
  and the long rest after it) is fitted by the 2RC model. For given time constants the model
  is linear in R0, R1, R2 and the polarisation left from before, so each (tau1, tau2) on a
  log grid is a linear least squares; the pair with the smallest residual wins.
* **Power test** (at each SOC level, pulses from a long rest at a ladder of currents, charge
  and discharge, up to the cut-offs): no model is fitted. Each pulse's overpotential at the
  state-of-power durations is measured, and the state of power is found from that table
  (bms/estimation/power.py): a cell's overpotential grows less than linearly with current
  (charge transfer) and more than linearly late in a long pulse (electrolyte depletion),
  which the 2RC model, fitted on gentle pulses, cannot carry to 20C.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from bms.estimation.ecm import SECONDS_PER_HOUR

OCV_GRID_POINTS = 101
REST_CURRENT_C_RATE = 0.005
"""Below this C-rate a sample counts as rest."""
MAX_GAP_S = 300.0
"""A longer gap between samples is a hole in the data, not a slow log."""
MAX_PULSE_S = 120.0
"""A current step this short is a pulse; longer ones move the SOC to the next step."""
MIN_REST_BEFORE_PULSE_S = 60.0
MAX_FIT_PULSE_C_RATE = 1.5
"""Pulses above this C-rate are left out of the impedance table: it is the small-signal
impedance the EKF runs on, and a cell's overpotential grows less than linearly with current
(charge transfer), so a 10C pulse fitted into it would make R0 jump between SOC points.
Tests with several rates per level (for state of power) keep only their gentle pulses here."""
MIN_PULSES = 3
POWER_MIN_REST_BEFORE_S = 1200.0
"""A power-test pulse starts from a cell rested this long (the charge put back after a pulse
follows a short rest and is not a pulse)."""
POWER_LEVEL_SOC_STEP = 0.005
"""Pulses whose starting SOC differ by less than this belong to one level."""
LADDER_TOLERANCE = 0.02
"""Pulse currents within this fraction of each other are one rung of a power test's ladder."""
POWER_SOC_COVER = 0.02
"""How far short of the others' lowest or highest SOC level a power test may stop."""
POWER_CUTOFF_REACHED_V = 0.05
"""A power-test pulse that ended before the longest duration must end this near the limit it
drove to (or within ``CUTOFF_LAG_STEPS`` of its last voltage step, whichever is farther) to
count as cut off by it; one that ended farther away stopped for another reason (a cycler's
stop, a dropped current, a charger's own lower cut-off) and says nothing about the limit."""
CUTOFF_LAG_STEPS = 2.0
"""A sparse log's last sample before a cut-off lags it: the voltage was still moving by its
last step, and faster as it went, so the limit may lie up to about two such steps away."""
POWER_UNHELD_MARGIN = 10.0
"""Where even the smallest current of the ladder was refused (past the limit at once), the
test found no safe current: the limit there is taken as this fraction of it (a tenth)."""
MIN_OVERPOTENTIAL_V = 1e-6
"""A measured overpotential is never taken below this (noise, or an OCV a millivolt off,
could make one zero or negative; the table's power laws need it positive)."""
POWER_LAW_MAX = 40.0
"""Steepest power law (overpotential against current) the completed table puts between a
held current and the next: steeper only overflows, it moves the limit by under 1 %."""
PAST_LIMIT_MAX = 3.0
"""The time-to-limit rule puts at most this times the overpotential that meets the limit at
the current past it (enough to place the limit; where it asks for more, the limit falls
nearer the held current). The other rules are not capped: a large value past the limit only
lowers the limit at the neighbouring levels interpolated towards it, the safe way."""
TEMP_STEP_C = 5.0
KELVIN = 273.15
TAU1_GRID_S = np.geomspace(1.0, 200.0, 19)
TAU2_GRID_S = np.geomspace(60.0, 6000.0, 17)


class FitError(ValueError):
    """Data that cannot be fitted, with what is missing in the message."""


@dataclass(frozen=True)
class TestData:
    """One test's samples, each (n,): time (s), current (A, positive charging), voltage (V),
    temperature (degC)."""

    name: str
    time_s: np.ndarray
    current_a: np.ndarray
    voltage_v: np.ndarray
    temp_c: np.ndarray


@dataclass(frozen=True)
class OcvFit:
    capacity_ah: float
    voltage_max_v: float
    voltage_min_v: float
    temp_c: float
    soc: np.ndarray
    ocv_v: np.ndarray
    hysteresis_v: float
    """Mean half-gap between the charge and discharge curves: what the mean cancels."""


@dataclass(frozen=True)
class PulseFit:
    soc: float
    r0_ohm: float
    r1_ohm: float
    c1_f: float
    r2_ohm: float
    c2_f: float
    rms_v: float


@dataclass(frozen=True)
class HppcFit:
    temp_c: float
    pulses: list[PulseFit]

    @property
    def rms_v(self) -> float:
        return float(np.sqrt(np.mean([p.rms_v**2 for p in self.pulses])))


@dataclass(frozen=True)
class PowerFit:
    """One power test: overpotential (V, towards the limit) of pulses from rest.

    soc: (n_levels,) rising; currents_a: (n_currents,) rising magnitudes.
    measured_v: (n_levels, 2, n_currents, n_durations), direction 0 discharge, 1 charge; NaN
    where the pulse did not run or did not last that long.
    lasted_s: (n_levels, 2, n_currents): how long each pulse ran (NaN: not run).
    headroom_v: (n_levels, 2): how far the rested cell was from each voltage limit (the
    least over the level's pulses).
    overpotential_v: measured_v completed (see :func:`fit_power`), what the map holds.
    stopped: pulses that ended short of the longest duration away from the limit
    (POWER_CUTOFF_REACHED_V), as (soc, direction, current_a, lasted_s): measured for as
    long as they ran and completed beyond like an untried current.
    """

    temp_c: float
    soc: np.ndarray
    currents_a: np.ndarray
    durations_s: tuple[float, ...]
    measured_v: np.ndarray
    lasted_s: np.ndarray
    headroom_v: np.ndarray
    overpotential_v: np.ndarray
    stopped: tuple[tuple[float, int, float, float], ...] = ()

    @property
    def pulses(self) -> int:
        return int(np.sum(~np.isnan(self.lasted_s)))


def check_samples(data: TestData) -> None:
    """Raise FitError for data no fit should see: time not rising, or holes in it."""
    dt_s = np.diff(data.time_s)
    if data.time_s.size < 10:
        raise FitError(f"{data.name}: only {data.time_s.size} samples")
    if np.any(dt_s <= 0.0):
        at = int(np.flatnonzero(dt_s <= 0.0)[0]) + 1
        raise FitError(f"{data.name}: time_s does not rise at sample {at} ({data.time_s[at]} s)")
    if dt_s.max() > MAX_GAP_S:
        at = int(np.argmax(dt_s))
        raise FitError(
            f"{data.name}: a gap of {dt_s[at]:.0f} s in the data after t = {data.time_s[at]:.0f} s"
            f" (at most {MAX_GAP_S:.0f} s between samples)"
        )


def charge_ah(data: TestData) -> np.ndarray:
    """Charge moved into the cell since the first sample (Ah, (n,)), trapezoidal rule."""
    steps = 0.5 * (data.current_a[1:] + data.current_a[:-1]) * np.diff(data.time_s)
    return np.concatenate(([0.0], np.cumsum(steps))) / SECONDS_PER_HOUR


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges where ``mask`` is True, stop exclusive."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _longest_run(mask: np.ndarray, time_s: np.ndarray) -> tuple[int, int] | None:
    runs = _runs(mask)
    if not runs:
        return None
    return max(runs, key=lambda run: time_s[run[1] - 1] - time_s[run[0]])


def fit_ocv(data: TestData) -> OcvFit:
    """The capacity and the OCV curve from a slow discharge and charge (see the module)."""
    check_samples(data)
    moved_ah = charge_ah(data)
    scale_a = max(np.abs(data.current_a).max(), 1e-9)
    discharge = _longest_run(data.current_a < -0.2 * scale_a, data.time_s)
    charge = _longest_run(data.current_a > 0.2 * scale_a, data.time_s)
    if discharge is None or charge is None:
        raise FitError(
            f"{data.name}: an OCV test needs a slow discharge and a slow charge "
            "(found " + ("no discharge" if discharge is None else "no charge") + "; "
            "current must be positive when charging)"
        )
    d0, d1 = discharge
    c0, c1 = charge
    v_dis, v_ch = data.voltage_v[d0:d1], data.voltage_v[c0:c1]
    if v_dis[-1] >= v_dis[0] or v_ch[-1] <= v_ch[0]:
        raise FitError(
            f"{data.name}: the voltage rises while the current is negative: the current's "
            "sign looks inverted (it must be positive when charging)"
        )
    capacity_ah = float(moved_ah[d0] - moved_ah[d1 - 1])
    charged_ah = float(moved_ah[c1 - 1] - moved_ah[c0])
    hours = (data.time_s[d1 - 1] - data.time_s[d0]) / SECONDS_PER_HOUR
    if hours < 5.0:
        raise FitError(
            f"{data.name}: the discharge lasts {hours:.1f} h; an OCV test discharges at C/10 "
            "or slower (about 10 h or more)"
        )
    # The limits the test ran between: at the top, the rested start or the charger's
    # constant-voltage tail (low current; a constant-current charge overshoots by its IR
    # drop), at the bottom the discharge's cut-off.
    low_current = np.abs(data.current_a) <= 0.5 * scale_a
    top_v = data.voltage_v[low_current] if low_current.any() else data.voltage_v
    voltage_max_v = float(np.round(top_v.max(), 2))
    voltage_min_v = float(np.round(v_dis.min(), 2))
    soc = np.linspace(0.0, 1.0, OCV_GRID_POINTS)
    soc_dis = 1.0 - (moved_ah[d0] - moved_ah[d0:d1]) / capacity_ah
    soc_ch = (moved_ah[c0:c1] - moved_ah[c0]) / charged_ah
    on_dis = np.interp(soc, soc_dis[::-1], v_dis[::-1])
    on_ch = np.interp(soc, soc_ch, v_ch)
    half_gap_v = 0.5 * (on_ch - on_dis)
    inner = (soc > 0.05) & (soc < 0.95)
    # Near the ends one curve meets its limit before the other: beyond the inner range, keep
    # the half-gap of its edge rather than the distorted one.
    half_gap_v = np.interp(soc, soc[inner], half_gap_v[inner])
    ocv_v = on_dis + half_gap_v
    ocv_v[0], ocv_v[-1] = voltage_min_v, voltage_max_v
    ocv_v = _strictly_rising(ocv_v)
    return OcvFit(
        capacity_ah=capacity_ah,
        voltage_max_v=voltage_max_v,
        voltage_min_v=voltage_min_v,
        temp_c=float(np.round(np.mean(data.temp_c), 1)),
        soc=soc,
        ocv_v=ocv_v,
        hysteresis_v=float(np.mean(np.abs(half_gap_v[inner]))),
    )


def _strictly_rising(values: np.ndarray, step: float = 1e-5) -> np.ndarray:
    """The running maximum, nudged so that no two neighbours are equal."""
    out = np.maximum.accumulate(values)
    for i in range(1, out.size):
        out[i] = max(out[i], out[i - 1] + step)
    return out


def _rc_basis(time_s: np.ndarray, current_a: np.ndarray, tau_s: np.ndarray) -> np.ndarray:
    """Voltage of an RC pair of R = 1 ohm per time constant, from rest: (n_tau, n)."""
    out = np.zeros((tau_s.size, time_s.size))
    dt_s = np.diff(time_s)
    step_a = 0.5 * (current_a[1:] + current_a[:-1])
    for k in range(1, time_s.size):
        decay = np.exp(-dt_s[k - 1] / tau_s)
        out[:, k] = decay * out[:, k - 1] + (1.0 - decay) * step_a[k - 1]
    return out


def _best_fit(time_s, current_a, overpotential_v, tau1_s, tau2_s):
    """The least-squares fit over every (tau1, tau2) pair of the two grids, or None."""
    t_rel = time_s - time_s[0]
    basis1 = _rc_basis(time_s, current_a, tau1_s)
    basis2 = _rc_basis(time_s, current_a, tau2_s)
    best = None
    for i, tau1 in enumerate(tau1_s):
        for j, tau2 in enumerate(tau2_s):
            if tau2 < 3.0 * tau1:
                continue
            design = np.column_stack(
                (current_a, basis1[i], basis2[j], np.exp(-t_rel / tau1), np.exp(-t_rel / tau2))
            )
            coef, *_ = np.linalg.lstsq(design, overpotential_v, rcond=None)
            if np.any(coef[:3] <= 0.0):
                continue
            rms = float(np.sqrt(np.mean((design @ coef - overpotential_v) ** 2)))
            if best is None or rms < best[-1]:
                best = (float(coef[0]), float(coef[1]), tau1, float(coef[2]), tau2, rms)
    return best


def fit_pulse_window(
    time_s: np.ndarray, current_a: np.ndarray, overpotential_v: np.ndarray
) -> tuple[float, float, float, float, float, float]:
    """Fit ``overpotential_v`` (terminal minus open-circuit voltage) over one window by
    R0 i + v1 + v2, with any polarisation from before decaying freely: a coarse log grid of
    time constants, then a fine one around the best pair.

    Returns (r0_ohm, r1_ohm, tau1_s, r2_ohm, tau2_s, rms_v); raises FitError if no pair of
    time constants gives positive resistances.
    """
    best = _best_fit(time_s, current_a, overpotential_v, TAU1_GRID_S, TAU2_GRID_S)
    if best is None:
        raise FitError("no time constants give positive resistances for this pulse")
    ratio1 = TAU1_GRID_S[1] / TAU1_GRID_S[0]
    ratio2 = TAU2_GRID_S[1] / TAU2_GRID_S[0]
    fine1 = best[2] * ratio1 ** np.linspace(-1.0, 1.0, 9)
    fine2 = best[4] * ratio2 ** np.linspace(-1.0, 1.0, 9)
    return _best_fit(time_s, current_a, overpotential_v, fine1, fine2) or best


def find_pulse_windows(data: TestData, capacity_ah: float) -> list[tuple[int, int, int]]:
    """(start, pulse_start, stop) index ranges, stop exclusive: each discharge pulse that
    follows a rest, with everything after it up to the next such pulse (the charge pulse, the
    step to the next SOC, and the long rest whose relaxation shows the slow time constant)."""
    rest = np.abs(data.current_a) <= REST_CURRENT_C_RATE * capacity_ah
    runs = _runs(~rest)
    pulse_starts = []
    for n, (start, stop) in enumerate(runs):
        rest_began_s = data.time_s[runs[n - 1][1]] if n else data.time_s[0]
        short = data.time_s[stop - 1] - data.time_s[start] <= MAX_PULSE_S
        rested = data.time_s[start] - rest_began_s >= MIN_REST_BEFORE_PULSE_S
        if short and rested and data.current_a[start] < 0.0:
            pulse_starts.append(start)
    stops = [*pulse_starts[1:], data.time_s.size] if pulse_starts else []
    return [
        (max(start - 2, 0), start, stop) for start, stop in zip(pulse_starts, stops, strict=True)
    ]


def counted_soc(data: TestData, ocv: OcvFit) -> np.ndarray:
    """SOC of every sample (n,): the OCV of the rested first sample, then coulomb counting."""
    soc0 = float(np.interp(data.voltage_v[0], ocv.ocv_v, ocv.soc))
    return soc0 + charge_ah(data) / ocv.capacity_ah


def fit_hppc(data: TestData, ocv: OcvFit) -> HppcFit:
    """Fit every pulse pair of one HPPC test up to ``MAX_FIT_PULSE_C_RATE``; SOC is counted
    from the rested first sample."""
    check_samples(data)
    soc = counted_soc(data, ocv)
    if np.abs(data.current_a).max() <= REST_CURRENT_C_RATE * ocv.capacity_ah:
        raise FitError(f"{data.name}: no current flows: this is not a pulse test")
    windows = find_pulse_windows(data, ocv.capacity_ah)
    if len(windows) < MIN_PULSES:
        raise FitError(
            f"{data.name}: found {len(windows)} discharge pulse(s) after a rest of at least "
            f"{MIN_REST_BEFORE_PULSE_S:.0f} s; a pulse test needs at least {MIN_PULSES} "
            f"(pulses up to {MAX_PULSE_S:.0f} s, each followed by a rest)"
        )
    gentle_a = MAX_FIT_PULSE_C_RATE * ocv.capacity_ah
    windows = [w for w in windows if abs(data.current_a[w[1]]) <= gentle_a]
    if len(windows) < MIN_PULSES:
        raise FitError(
            f"{data.name}: {len(windows)} discharge pulse(s) at up to "
            f"{MAX_FIT_PULSE_C_RATE:g}C ({gentle_a:.2f} A); a pulse test needs at least "
            f"{MIN_PULSES} at that rate or below (faster ones are left out of the fit)"
        )
    pulses = []
    in_windows = np.zeros(data.time_s.size, dtype=bool)
    for start, pulse_start, stop in windows:
        window = slice(start, stop)
        in_windows[window] = True
        ocv_v = np.interp(soc[window], ocv.soc, ocv.ocv_v)
        r0, r1, tau1, r2, tau2, rms = fit_pulse_window(
            data.time_s[window], data.current_a[window], data.voltage_v[window] - ocv_v
        )
        pulses.append(
            PulseFit(
                soc=float(soc[pulse_start]),
                r0_ohm=r0,
                r1_ohm=r1,
                c1_f=tau1 / r1,
                r2_ohm=r2,
                c2_f=tau2 / r2,
                rms_v=rms,
            )
        )
    # the temperature of the fitted pulses: faster ones between them warm the cell
    return HppcFit(temp_c=float(np.round(np.mean(data.temp_c[in_windows]), 1)), pulses=pulses)


def impedance_grid(
    fits: list[HppcFit], temp_step_c: float = TEMP_STEP_C
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Put every test's pulses on one grid: SOC points of the test with the most pulses
    (rounded to 0.01), each test interpolated onto them (held at its own first and last
    pulse beyond). Returns soc (n_soc,), temp_c (n_temp,), impedance (n_temp, n_soc, 5).

    Between two tested temperatures, rows are added every ``temp_step_c``, interpolated as
    Arrhenius does (log of each resistance and time constant linear in 1/T): resistance
    rises exponentially into the cold, and the kernels' linear interpolation between rows far
    apart would overstate it at every temperature in between. Time constants, not
    capacitances, are interpolated (over SOC too): a capacitance is a ratio of what the fits
    pin down, and interpolating it alone makes time constants that no fit produced.
    """
    fits = sorted(fits, key=lambda fit: fit.temp_c)
    tested = np.array([fit.temp_c for fit in fits])
    if np.unique(tested).size != tested.size:
        raise FitError(f"two pulse tests at the same temperature ({tested} degC)")
    densest = max(fits, key=lambda fit: len(fit.pulses))
    soc_grid = np.unique(np.clip(np.round([p.soc for p in densest.pulses], 2), 0.0, 1.0))
    measured = np.empty((tested.size, soc_grid.size, 5))
    for t, fit in enumerate(fits):
        order = np.argsort([p.soc for p in fit.pulses])
        pulses = [fit.pulses[i] for i in order]
        socs = np.array([p.soc for p in pulses])
        # Resistances and time constants are what the fits pin down; a capacitance is their
        # ratio, and interpolating it separately makes time constants no fit produced.
        for k, values in enumerate(
            (
                [p.r0_ohm for p in pulses],
                [p.r1_ohm for p in pulses],
                [p.r1_ohm * p.c1_f for p in pulses],
                [p.r2_ohm for p in pulses],
                [p.r2_ohm * p.c2_f for p in pulses],
            )
        ):
            measured[t, :, k] = np.interp(soc_grid, socs, values)
    temps = [tested[0]]
    for low, high in itertools.pairwise(tested):
        steps = max(int(np.ceil((high - low) / temp_step_c)), 1)
        temps.extend(np.linspace(low, high, steps + 1)[1:])
    temps = np.round(np.array(temps), 2)
    if tested.size == 1:
        table = measured
    else:
        inverse_k = 1.0 / (tested + KELVIN)
        table = np.empty((temps.size, soc_grid.size, 5))
        for t, temp_c in enumerate(temps):
            hi = int(np.clip(np.searchsorted(tested, temp_c), 1, tested.size - 1))
            lo = hi - 1
            weight = (1.0 / (temp_c + KELVIN) - inverse_k[lo]) / (inverse_k[hi] - inverse_k[lo])
            log_table = np.log(measured[lo]) * (1.0 - weight) + np.log(measured[hi]) * weight
            table[t] = np.exp(log_table)
    # Columns 2 and 4 hold the time constants so far: make them capacitances.
    table[..., 2] /= table[..., 1]
    table[..., 4] /= table[..., 3]
    return soc_grid, temps, table


def fit_power(data: TestData, ocv: OcvFit, durations_s: tuple[float, ...]) -> PowerFit:
    """Measure every pulse from rest of one power test (see the module) and complete the
    table; SOC is counted from the rested first sample.

    A pulse's time runs from its first sample under current. Its overpotential at ``t`` is
    the voltage's move from the rested value less the OCV's move over the charge it passed
    (from the OCV test's curve), signed towards the limit it drives to. Where a pulse did
    not last a duration, the table is completed from when it met the limit
    (:func:`complete_power_level`).
    """
    check_samples(data)
    soc = counted_soc(data, ocv)
    rest = np.abs(data.current_a) <= REST_CURRENT_C_RATE * ocv.capacity_ah
    runs = _runs(~rest)
    pulses = []  # (soc, direction, current magnitude, start index, stop index)
    for n, (start, stop) in enumerate(runs):
        rest_began_s = data.time_s[runs[n - 1][1]] if n else data.time_s[0]
        rested = data.time_s[start] - rest_began_s >= POWER_MIN_REST_BEFORE_S
        short = data.time_s[stop - 1] - data.time_s[start] <= MAX_PULSE_S
        if rested and short and start > 0:
            amps = float(np.median(data.current_a[start:stop]))
            pulses.append((float(soc[start]), int(amps > 0.0), abs(amps), start, stop))
    if not pulses:
        raise FitError(
            f"{data.name}: no pulse after a rest of at least {POWER_MIN_REST_BEFORE_S:.0f} s: "
            "a power test pulses from a rested cell (pulses up to "
            f"{MAX_PULSE_S:.0f} s)"
        )
    currents_a, rungs = _ladder([p[2] for p in pulses])
    levels: list[list[tuple]] = []  # each pulse with its rung of the ladder
    for pulse, rung in zip(pulses, rungs, strict=True):
        if levels and abs(pulse[0] - levels[-1][0][0]) < POWER_LEVEL_SOC_STEP:
            levels[-1].append((*pulse, int(rung)))
        else:
            levels.append([(*pulse, int(rung))])
    if len(levels) < 2 or currents_a.size < 2:
        raise FitError(
            f"{data.name}: pulses at {len(levels)} SOC level(s) and {currents_a.size} "
            "current(s); a power test needs at least two of each"
        )
    shape = (len(levels), 2, currents_a.size, len(durations_s))
    measured_v, overpotential_v = np.full(shape, np.nan), np.full(shape, np.nan)
    lasted_s = np.full(shape[:3], np.nan)
    headroom_v = np.full((len(levels), 2), np.nan)
    stopped = []
    level_soc = np.array([np.median([p[0] for p in level]) for level in levels])
    for lv, level in enumerate(levels):
        trajectories = {}  # (direction, current index) -> (time_s, overpotential_v)
        was_stopped = np.zeros((2, currents_a.size), dtype=bool)
        pulse_headroom_v = np.full((2, currents_a.size), np.nan)
        for pulse_soc, direction, amps, start, stop, k in level:
            sign = 1.0 if direction else -1.0
            rest_v = data.voltage_v[start - 1]
            rest_headroom_v = _headroom_v(ocv, rest_v)
            pulse_headroom_v[direction, k] = rest_headroom_v[direction]
            headroom_v[lv] = np.fmin(headroom_v[lv], rest_headroom_v)
            time_s = data.time_s[start:stop] - data.time_s[start]
            if time_s[-1] < durations_s[-1] and _stopped_short(data, ocv, direction, start, stop):
                if time_s[-1] <= 0.0:
                    continue  # one sample: nothing measured, left as not run
                was_stopped[direction, k] = True
                stopped.append((float(pulse_soc), direction, float(amps), float(time_s[-1])))
            moves_v = _ocv_move_v(ocv, pulse_soc, sign * amps, time_s)
            trajectories[direction, k] = (
                time_s,
                sign * (data.voltage_v[start:stop] - rest_v) - moves_v,
            )
            lasted_s[lv, direction, k] = time_s[-1]
        for direction, d in itertools.product(range(2), range(len(durations_s))):
            sign = 1.0 if direction else -1.0
            # each pulse's own rest; one that did not run, the last rest before it
            filled = pulse_headroom_v[direction].copy()
            last_v = headroom_v[lv, direction]
            for k in range(currents_a.size):
                if np.isnan(filled[k]):
                    filled[k] = last_v
                last_v = filled[k]

            def crossing_v(amps, time_s, lv=lv, sign=sign, filled=filled):
                """The overpotential a pulse of ``amps`` meets the limit with at ``time_s``."""
                k = max(int(np.searchsorted(currents_a, amps, side="right")) - 1, 0)
                move_v = _ocv_move_v(ocv, level_soc[lv], sign * amps, time_s)
                return max(filled[k] - float(move_v), 1e-4)

            row = [trajectories.get((direction, k)) for k in range(currents_a.size)]
            measured_v[lv, direction, :, d] = [_held_at(tr, durations_s[d]) for tr in row]
            overpotential_v[lv, direction, :, d] = complete_power_level(
                currents_a, row, durations_s[d], crossing_v, was_stopped[direction]
            )
    order = np.argsort(level_soc)
    return PowerFit(
        # the rested cell's temperature: a fast pulse warms it while it lasts
        temp_c=float(np.round(np.mean(data.temp_c[[p[3] - 1 for p in pulses]]), 1)),
        soc=level_soc[order],
        currents_a=currents_a,
        durations_s=tuple(durations_s),
        measured_v=measured_v[order],
        lasted_s=lasted_s[order],
        headroom_v=headroom_v[order],
        overpotential_v=overpotential_v[order],
        stopped=tuple(stopped),
    )


def _stopped_short(data: TestData, ocv: OcvFit, direction: int, start: int, stop: int) -> bool:
    """Whether a pulse's last sample is too far from the limit it drove to for the limit
    to have ended it (POWER_CUTOFF_REACHED_V, CUTOFF_LAG_STEPS)."""
    end_headroom_v = _headroom_v(ocv, data.voltage_v[stop - 1])[direction]
    last_step_v = abs(data.voltage_v[stop - 1] - data.voltage_v[max(stop - 2, start)])
    return end_headroom_v > max(POWER_CUTOFF_REACHED_V, CUTOFF_LAG_STEPS * last_step_v)


def _headroom_v(ocv: OcvFit, voltage_v: float) -> list[float]:
    """How far ``voltage_v`` is from the lower and the upper limit (discharge, charge)."""
    return [voltage_v - ocv.voltage_min_v, ocv.voltage_max_v - voltage_v]


def _ocv_move_v(ocv: OcvFit, soc: float, current_a: float, time_s):
    """How far the OCV moves towards the limit ``current_a`` drives to in ``time_s``
    (a number or an array)."""
    soc_end = soc + current_a * np.asarray(time_s) / (SECONDS_PER_HOUR * ocv.capacity_ah)
    move_v = np.interp(soc_end, ocv.soc, ocv.ocv_v) - np.interp(soc, ocv.soc, ocv.ocv_v)
    return np.sign(current_a) * move_v


def complete_power_level(
    currents_a, trajectories, duration_s, crossing_v, stopped=None
) -> np.ndarray:
    """One level's overpotential at ``duration_s`` (V, (n_currents,)) for every current.

    trajectories: per current, (time_s, overpotential_v) of its pulse from its start to
    where it ended, or None where it did not run; crossing_v(amps, time_s): the
    overpotential at which a pulse of ``amps`` meets the limit at ``time_s``; stopped: per
    current, True where its pulse ended early away from the limit (None: none did).

    A pulse that lasted the duration gives its own value. One that met the limit sooner,
    at ``t``, had the crossing value then (or its last sample's, if past it), and is taken
    to grow from there as the largest held pulse did, with time squeezed by the square of
    their currents' ratio: depletion near a surface goes as current times sqrt(time)
    (Sand), so a larger current runs through the same curve faster. The part of the
    overpotential that does not grow with time makes this the safe side. It is also at
    least in proportion to current from the held one. A pulse not run above every one that
    did was past the limit at once (``t`` = 0), unless the highest that ran was stopped.

    A stopped pulse says nothing of the limit, only of its overpotential while it ran: below
    a current that ran, it is filled as one not tried; the highest that ran grows from its
    last value as one that met the limit would (with no crossing), and the currents above it
    were not tried. A current not tried between two that ran is interpolated as a power
    law, and above them carried on at the last two's power (at least in proportion). Where
    no pulse held the duration, the growth is taken as sqrt(duration / t), and where even
    the smallest was refused (or no pulse ran that way at all), ``POWER_UNHELD_MARGIN``
    times its crossing (a limit of about a tenth of it). The result rises with current.
    """
    ran = np.array([tr is not None for tr in trajectories])
    stopped = np.zeros(ran.size, dtype=bool) if stopped is None else np.asarray(stopped)
    tried_above = np.flip(np.logical_or.accumulate(np.flip(ran)))
    ran_above = np.append(tried_above[1:], False)
    highest_stopped = ran.any() and stopped[np.flatnonzero(ran)[-1]]
    out = np.maximum([_held_at(tr, duration_s) for tr in trajectories], MIN_OVERPOTENTIAL_V)
    held = np.flatnonzero(~np.isnan(out))
    for k in np.flatnonzero(np.isnan(out)):
        if (not ran[k] and (tried_above[k] or highest_stopped)) or (stopped[k] and ran_above[k]):
            continue  # not tried (or as good as): filled below
        met_s = trajectories[k][0][-1] if ran[k] else 0.0
        if stopped[k]:
            meets_v = trajectories[k][1][-1]
        else:
            meets_v = crossing_v(currents_a[k], met_s)
            if ran[k]:  # its last sample may lie past the limit already
                meets_v = max(meets_v, trajectories[k][1][-1])
        if held.size:
            ref = held[-1]
            squeeze = (currents_a[k] / currents_a[ref]) ** 2
            growth = _extended(trajectories[ref], duration_s * squeeze) / max(
                _extended(trajectories[ref], met_s * squeeze), MIN_OVERPOTENTIAL_V
            )
            in_proportion_v = out[ref] * currents_a[k] / currents_a[ref]
            out[k] = max(meets_v * max(growth, 1.0), in_proportion_v)
            if k == ref + 1 and not stopped[k]:
                out[k] = max(out[k], _placed_by_time_to_limit(
                    currents_a, trajectories, stopped, ref, out[ref], duration_s, crossing_v
                ))  # fmt: skip
        elif met_s > 0.0:
            out[k] = meets_v * math.sqrt(duration_s / met_s)
        else:
            out[k] = meets_v * POWER_UNHELD_MARGIN
        if not stopped[k]:
            out[k] = max(out[k], crossing_v(currents_a[k], duration_s))
    known = np.flatnonzero(~np.isnan(out))
    for k in np.flatnonzero(np.isnan(out)):  # not tried: between, below or above those known
        below, higher = known[known < k], known[known > k]
        if below.size and higher.size:
            i, j = below[-1], higher[0]
        elif below.size > 1:
            i, j = below[-2], below[-1]
        else:
            j = below[-1] if below.size else higher[0]
            out[k] = out[j] * currents_a[k] / currents_a[j]
            continue
        power = math.log(out[j] / out[i]) / math.log(currents_a[j] / currents_a[i])
        if not higher.size:
            power = max(power, 1.0)
        out[k] = out[i] * (currents_a[k] / currents_a[i]) ** power
    return np.maximum.accumulate(np.maximum(out, MIN_OVERPOTENTIAL_V))


def _held_at(trajectory, duration_s: float) -> float:
    """A pulse's overpotential at ``duration_s``, NaN if it did not run or end that late."""
    if trajectory is None or trajectory[0][-1] < duration_s - 1e-6:
        return math.nan
    return float(np.interp(duration_s, *trajectory))


def _placed_by_time_to_limit(currents_a, trajectories, stopped, ref, ref_v, duration_s, crossing_v):
    """The overpotential at ``currents_a[ref + 1]`` (which met the limit before
    ``duration_s``) that puts the limit where the times to the limit say; 0 where they
    cannot say.

    Where a current depletes the cell, the time a pulse takes to reach the limit falls as
    a power of its current (Sand: t ~ I^-2 for diffusion alone). The two pulses above the
    held one give that power; the current that would last exactly ``duration_s`` follows,
    and the overpotential there is the crossing. A power law from the held pulse through
    that point, carried on to the next current, is the value.
    """
    b, c = ref + 1, ref + 2
    if c >= currents_a.size or trajectories[b] is None or trajectories[c] is None or stopped[c]:
        return 0.0
    met_b, met_c = trajectories[b][0][-1], trajectories[c][0][-1]
    if not 0.0 < met_c < met_b:
        return 0.0
    power = math.log(met_b / met_c) / math.log(currents_a[c] / currents_a[b])
    power = min(max(power, 1.0), 4.0)  # from resistance alone (1) to twice Sand's
    limit_a = currents_a[b] * (met_b / duration_s) ** (1.0 / power)
    limit_a = min(max(limit_a, 1.01 * currents_a[ref]), currents_a[b])  # never on the held one
    slope = math.log(crossing_v(limit_a, duration_s) / ref_v) / math.log(limit_a / currents_a[ref])
    placed_v = ref_v * (currents_a[b] / currents_a[ref]) ** min(max(slope, 0.0), POWER_LAW_MAX)
    return min(placed_v, PAST_LIMIT_MAX * crossing_v(currents_a[b], duration_s))


def _extended(trajectory, time_s: float) -> float:
    """A held pulse's overpotential at ``time_s``, past its end carried on at the slope of
    its last third (it grows more slowly as it goes: the line stays above it)."""
    pulse_s, eta_v = trajectory
    if time_s <= pulse_s[-1]:
        return float(np.interp(time_s, pulse_s, eta_v))
    start_s = 2.0 * pulse_s[-1] / 3.0
    slope = (eta_v[-1] - np.interp(start_s, pulse_s, eta_v)) / (pulse_s[-1] - start_s)
    return float(eta_v[-1] + max(slope, 0.0) * (time_s - pulse_s[-1]))


def _ladder(amps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The ladder's currents (rising) and each pulse's rung in it: pulses within
    LADDER_TOLERANCE of a rung's smallest are that rung (a cycler's current wanders by a
    fraction of a per cent), whose current is their median to 3 significant digits."""
    rungs = np.empty(len(amps), dtype=int)
    groups: list[list[float]] = []
    for i in np.argsort(amps):
        if not groups or amps[i] > groups[-1][0] * (1.0 + LADDER_TOLERANCE):
            groups.append([])
        groups[-1].append(amps[i])
        rungs[i] = len(groups) - 1
    medians = np.array([np.median(group) for group in groups])
    scale = 10.0 ** (2 - np.floor(np.log10(medians)))
    return np.round(medians * scale) / scale, rungs


def power_grid(fits: list[PowerFit]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Put every power test on one grid: the SOC levels of the test with the most pulses
    (rounded to 0.001), each test interpolated onto them (held at its own ends beyond).
    Returns soc (n_soc,), temp_c (n_temp,), currents_a (n_currents,) and overpotential_v
    (n_temp, n_soc, 2, n_currents, n_durations). The tests must share one current ladder
    (one procedure at every temperature).
    """
    fits = sorted(fits, key=lambda fit: fit.temp_c)
    tested = np.array([fit.temp_c for fit in fits])
    if np.unique(tested).size != tested.size:
        raise FitError(f"two power tests at the same temperature ({tested} degC)")
    if len({fit.durations_s for fit in fits}) != 1:
        raise FitError("power tests measured at different durations")
    currents_a = fits[0].currents_a
    for fit in fits[1:]:
        if fit.currents_a.shape != currents_a.shape or not np.allclose(
            fit.currents_a, currents_a, rtol=LADDER_TOLERANCE, atol=0.0
        ):
            raise FitError(
                f"power tests pulse different currents ({list(currents_a)} A at "
                f"{fits[0].temp_c:g} degC, {list(fit.currents_a)} A at {fit.temp_c:g} degC): "
                "run one procedure at every temperature"
            )
    densest = max(fits, key=lambda fit: fit.pulses)
    soc_grid = np.unique(np.clip(np.round(densest.soc, 3), 0.0, 1.0))
    for fit in fits:
        if (
            fit.soc[0] > soc_grid[0] + POWER_SOC_COVER
            or fit.soc[-1] < soc_grid[-1] - POWER_SOC_COVER
        ):
            raise FitError(
                f"the power test at {fit.temp_c:g} degC covers SOC {fit.soc[0]:.3f}-"
                f"{fit.soc[-1]:.3f}, the one at {densest.temp_c:g} degC {soc_grid[0]:.3f}-"
                f"{soc_grid[-1]:.3f}: beyond its levels its state of power would be a guess "
                "(run the same levels at every temperature)"
            )
    n_durations = len(fits[0].durations_s)
    table = np.empty((tested.size, soc_grid.size, 2, currents_a.size, n_durations))
    for t, fit in enumerate(fits):
        for direction, k, d in itertools.product(
            range(2), range(currents_a.size), range(n_durations)
        ):
            table[t, :, direction, k, d] = np.interp(
                soc_grid, fit.soc, fit.overpotential_v[:, direction, k, d]
            )
    return soc_grid, tested, currents_a, table
