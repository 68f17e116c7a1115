"""Extended Kalman filter over the ECM, for every cell of the pack in one compiled call.

State per cell ``[soc, v_rc1_v, v_rc2_v]``. The prediction uses the measured ``dt_s`` and the
mean current between the two samples; the update compares the measured terminal voltage with
the model's, and an update that moves the SOC far is iterated (an iterated EKF step).
The 3×3 algebra is written out; the covariance update is the symmetric short form on its six
unique entries, which stays positive definite since the gain is the optimal one for its H and
S includes R > 0 (Joseph's form, five times the work, matters only for a suboptimal gain). A
cell whose voltage (or the current) is NaN skips the update: its uncertainty grows by the
prediction alone, and its state is not touched by the bad reading.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from bms.estimation.cell_params import EkfTuning
from bms.estimation.ecm import (
    C1,
    C2,
    R1,
    R2,
    SECONDS_PER_HOUR,
    EcmTables,
    at_temperature,
    impedance_at,
    ocv_at,
    r0_at,
    rc_decay,
    step_current_a,
)

SOC_STATE_LIMITS = (-0.05, 1.05)
"""The SOC state is held inside these bounds; a little beyond [0, 1] so the filter near full or
empty is not biased by the clamp."""
MAX_SOC_VARIANCE = 0.25
"""An SOC standard deviation of 0.5 says "unknown"; growing it further only risks overflow."""
ITERATE_BEYOND_SOC = 0.01
"""An update that moves the SOC further than this is iterated."""
MAX_UPDATE_ITERATIONS = 8
ITERATION_TOLERANCE_SOC = 1e-5
INNOVATION_GATE_SIGMA = 5.0
"""A voltage that lands further than this many standard deviations from the prediction, and
got there in one step (its innovation moved by as much since the last sample), is held back
rather than believed at once: one sample taken across a load step (cell voltages of one
instant, the current of another) or a glitch would otherwise move the SOC a long way on a
single reading, with a small uncertainty after it. An innovation that grew there slowly is the
model drifting from the cell (cold, aged): holding it back would only let the error grow, so
it is taken."""
GATE_HOLD_S = 1.0
"""A cell's readings stay held back at most this long in a row: a voltage that stays far from
the prediction is the truth (the state is wrong), and from then on it is taken, every sample,
until one falls inside the gate again."""
UNKNOWN_CURRENT_C_RATE = 1.0
"""While the current is NaN, the SOC's standard deviation grows as if a current of this C-rate
could have flowed for any share of the time: by sqrt(t / 1 h) at 1C, so 0.1 after 36 s and
0.5 ("unknown", the cap) after 15 minutes, whatever the loop's rate."""


@njit(cache=True, inline="always")
def _innovation_variance(p, h, noise_var, ph):
    """H P H' + R for one cell's p (3, 3); leaves P H' in ``ph`` (3,)."""
    s_var = noise_var
    for r in range(3):
        ph[r] = p[r, 0] * h[0] + p[r, 1] * h[1] + p[r, 2] * h[2]
        s_var += h[r] * ph[r]
    return s_var


@njit(cache=True)
def _iterated_update(
    tables, imp_row, ocv_row, p, x, voltage_v, current_a, noise_var, h, k, ph, scratch
):
    """Gauss-Newton update of one cell, for a correction too large for one linearisation:
    when the SOC moves far (a start 30 % off, say), the OCV's slope at the prior is a poor
    guide to where it should go, so the measurement is linearised again about the updated
    state until it settles. x (3,) is updated in place; h and k (3,) are left as the last
    linearisation and gain, for the covariance update. scratch: (6,).
    """
    prior, point = scratch[0:3], scratch[3:6]
    for r in range(3):
        prior[r] = x[r]
        point[r] = x[r]
    for iteration in range(MAX_UPDATE_ITERATIONS):
        r0 = r0_at(tables, imp_row, point[0])
        ocv, slope = ocv_at(tables, ocv_row, point[0])
        h[0] = slope
        residual = voltage_v - (ocv + point[1] + point[2] + r0 * current_a)
        for r in range(3):
            residual -= h[r] * (prior[r] - point[r])
        s_var = _innovation_variance(p, h, noise_var, ph)
        moved = 0.0
        for r in range(3):
            k[r] = ph[r] / s_var
            value = prior[r] + k[r] * residual
            if r == 0:
                value = min(max(value, SOC_STATE_LIMITS[0]), SOC_STATE_LIMITS[1])
                moved = abs(value - point[0])
            point[r] = value
        if iteration > 0 and moved < ITERATION_TOLERANCE_SOC:
            break
    for r in range(3):
        x[r] = point[r]
    return s_var


@njit(cache=True)
def ekf_step(
    tables,
    tuning,
    capacity_ah,
    x,
    p,
    previous_current_a,
    current_a,
    voltage_v,
    temp_c,
    dt_s,
    update,
):
    """Advance every cell by ``dt_s`` seconds and correct it with its measured voltage.

    tables, tuning: the fields of EcmTables and EkfTuning as plain tuples (a named tuple
    costs microseconds per call just to type). capacity_ah, previous_current_a, current_a (cell
    currents, A, positive charging; the previous sample's and this one's), voltage_v, temp_c:
    (n_cells,). x: (n_cells, 3) and p: (n_cells, 3, 3), updated in place. update:
    (n_cells, 3), read and written, carried from call to call: per cell the innovation (measured
    minus predicted voltage, V; NaN where the update was skipped), its predicted standard
    deviation (V), and the seconds its readings have been held back in a row (the gate).
    """
    tables = EcmTables(*tables)
    tuning = EkfTuning(*tuning)
    # One allocation for all the scratch vectors: at a few dozen cells, ten small ones cost
    # as much as the cells themselves.
    work = np.empty(26)
    z = work[0:5]
    f, b, h, k = work[5:8], work[8:11], work[11:14], work[14:17]
    ph = work[17:20]
    current_var = tuning.current_noise_a**2
    soc_walk_var = tuning.soc_random_walk_per_sqrt_h**2 * dt_s / SECONDS_PER_HOUR
    polarisation_var = tuning.polarisation_error_v**2
    voltage_var = tuning.voltage_noise_v**2
    for c in range(x.shape[0]):
        imp_row = at_temperature(tables.imp_temp_c, temp_c[c])
        impedance_at(tables, imp_row, x[c, 0], z)
        a1, built1 = rc_decay(z[R1], z[C1], dt_s)
        a2, built2 = rc_decay(z[R2], z[C2], dt_s)
        f[0] = 1.0
        f[1] = a1
        f[2] = a2
        b[0] = dt_s / (SECONDS_PER_HOUR * capacity_ah[c])
        b[1] = z[R1] * built1
        b[2] = z[R2] * built2
        i_step = step_current_a(previous_current_a[c], current_a[c])
        input_var = current_var
        unknown_soc_var = 0.0
        if math.isnan(i_step):
            i_step = 0.0
            input_var = (UNKNOWN_CURRENT_C_RATE * capacity_ah[c]) ** 2
            unknown_soc_var = UNKNOWN_CURRENT_C_RATE**2 * dt_s / SECONDS_PER_HOUR

        # Predict: x = F x + B i, P = F P F' + B var(i) B' + the SOC's random walk and the
        # polarisation's fading error.
        for r in range(3):
            x[c, r] = f[r] * x[c, r] + b[r] * i_step
        x[c, 0] = min(max(x[c, 0], SOC_STATE_LIMITS[0]), SOC_STATE_LIMITS[1])
        for r in range(3):
            for s in range(r, 3):
                value = f[r] * p[c, r, s] * f[s] + b[r] * input_var * b[s]
                p[c, r, s] = value
                p[c, s, r] = value
        p[c, 0, 0] = min(p[c, 0, 0] + soc_walk_var + unknown_soc_var, MAX_SOC_VARIANCE)
        # The polarisation's own error fades as the branch does (a Gauss-Markov process of
        # variance polarisation_var): it can take up a few mV of model error, but cannot hold
        # a wrong SOC for long where the OCV is flat, as a random walk would.
        # 1 - a^2 as (1 - a)(1 + a), from rc_decay's 1 - a, which keeps its digits at small dt
        p[c, 1, 1] += polarisation_var * built1 * (1.0 + a1)
        p[c, 2, 2] += polarisation_var * built2 * (1.0 + a2)

        if math.isnan(voltage_v[c]) or math.isnan(current_a[c]):
            update[c, 0] = math.nan
            update[c, 1] = math.nan
            continue

        # Update with the terminal voltage y = ocv(soc) + v1 + v2 + R0 i.
        ocv_row = at_temperature(tables.ocv_temp_c, temp_c[c])
        r0 = r0_at(tables, imp_row, x[c, 0])
        ocv, slope = ocv_at(tables, ocv_row, x[c, 0])
        # The model's own error grows with the voltage the impedance accounts for.
        impedance_v = abs(r0 * current_a[c]) + abs(x[c, 1]) + abs(x[c, 2])
        noise_var = (
            voltage_var + r0**2 * current_var + (tuning.impedance_error_ratio * impedance_v) ** 2
        )
        innovation = voltage_v[c] - (ocv + x[c, 1] + x[c, 2] + r0 * current_a[c])
        h[0] = slope
        h[1] = 1.0
        h[2] = 1.0
        s_var = _innovation_variance(p[c], h, noise_var, ph)
        gate_var = INNOVATION_GATE_SIGMA**2 * s_var
        # NaN after a skipped update or a restart: then any far-off reading counts as a jump
        previous_innovation = update[c, 0]
        update[c, 0] = innovation
        update[c, 1] = math.sqrt(s_var)
        if innovation * innovation <= gate_var:
            update[c, 2] = 0.0
        elif update[c, 2] < GATE_HOLD_S and (
            update[c, 2] > 0.0
            or math.isnan(previous_innovation)
            or (innovation - previous_innovation) ** 2 > gate_var
        ):
            update[c, 2] += dt_s  # held back: the prediction alone, P grown by it
            continue
        # else: drifted out slowly, or held for GATE_HOLD_S already: taken while it stays out
        for r in range(3):
            k[r] = ph[r] / s_var
        if abs(k[0] * innovation) < ITERATE_BEYOND_SOC:
            for r in range(3):
                x[c, r] += k[r] * innovation
            x[c, 0] = min(max(x[c, 0], SOC_STATE_LIMITS[0]), SOC_STATE_LIMITS[1])
        else:
            s_var = _iterated_update(
                tables, imp_row, ocv_row, p[c], x[c], voltage_v[c], current_a[c], noise_var,
                h, k, ph, work[20:26],
            )  # fmt: skip

        # P = P - (P H')(P H')' / S, on the six unique entries.
        for r in range(3):
            for s in range(r, 3):
                value = p[c, r, s] - ph[r] * ph[s] / s_var
                p[c, r, s] = value
                p[c, s, r] = value
