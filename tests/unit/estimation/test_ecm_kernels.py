"""The ECM kernels: the model's response, the EKF and state of power, against references
written here in plain NumPy from the textbook equations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from bms.estimation import ecm
from bms.estimation.ekf import GATE_HOLD_S, INNOVATION_GATE_SIGMA, ekf_step
from bms.estimation.power import power_limits


def run_ekf(cell, x, p, previous_a, current_a, voltage_v, temp_c, dt_s, update=None):
    """One ekf_step; ``update`` (n, 3) carries the gate's timers between calls (None: a fresh
    one, so nothing has been gated yet)."""
    n = x.shape[0]
    update = np.zeros((n, 3)) if update is None else update
    ekf_step(
        tuple(cell.tables),
        tuple(cell.tuning),
        np.full(n, cell.capacity_ah),
        x,
        p,
        np.asarray(previous_a, float),
        np.asarray(current_a, float),
        np.asarray(voltage_v, float),
        np.asarray(temp_c, float),
        dt_s,
        update,
    )
    return update[:, 0].copy(), update[:, 1].copy()


def test_model_response_to_a_constant_current_matches_the_closed_form(linear):
    """From rest at SOC 0.5, 25 degC: SOC falls by I t / 3600 Q and each RC pair charges
    towards R I with its own time constant (R1 = 15 mOhm x 100 F, R2 = 20 mOhm x 2 kF)."""
    n, current_a = 601, -2.0
    t_s = np.arange(n, dtype=float)
    voltage_v, soc = ecm.simulate(
        linear.tables, 2.0, 0.5, np.full(n, current_a), np.full(n, 25.0), np.ones(n)
    )
    expected_soc = 0.5 + current_a * t_s / 7200.0
    assert soc == pytest.approx(expected_soc)
    r0 = 0.01 + 0.0005 * 15.0
    # R1 changes with SOC (0.01 + 0.01 soc); the pair's voltage follows it closely enough.
    r1 = 0.01 + 0.01 * expected_soc
    v_rc = r1 * current_a * (1 - np.exp(-t_s / (r1 * 100))) + 0.02 * current_a * (
        1 - np.exp(-t_s / 40.0)
    )
    expected_v = 3.0 + expected_soc + 0.05 + v_rc + r0 * current_a
    assert voltage_v == pytest.approx(expected_v, abs=2e-4)


def test_step_current_is_the_mean_of_its_ends_and_survives_a_nan():
    assert ecm.step_current_a(1.0, 3.0) == 2.0
    assert ecm.step_current_a(math.nan, 3.0) == 3.0
    assert ecm.step_current_a(1.0, math.nan) == 1.0


def reference_ekf(cell, x, p, previous_a, current_a, voltage_v, temp_c, dt_s):
    """One textbook EKF step for one cell with dense matrices (Joseph form)."""
    t = cell.tuning
    r0, r1, c1, r2, c2 = cell.impedance_at(x[0], temp_c).values()
    a1, a2 = math.exp(-dt_s / (r1 * c1)), math.exp(-dt_s / (r2 * c2))
    f = np.diag([1.0, a1, a2])
    b = np.array([dt_s / (3600.0 * cell.capacity_ah), r1 * (1 - a1), r2 * (1 - a2)])
    i_step = 0.5 * (previous_a + current_a)
    x = f @ x + b * i_step
    q = np.outer(b, b) * t.current_noise_a**2 + np.diag(
        [
            t.soc_random_walk_per_sqrt_h**2 * dt_s / 3600.0,
            t.polarisation_error_v**2 * (1.0 - a1**2),
            t.polarisation_error_v**2 * (1.0 - a2**2),
        ]
    )
    p = f @ p @ f.T + q
    r0 = cell.impedance_at(x[0], temp_c)["r0_ohm"]
    ocv = float(cell.ocv_at(x[0], temp_c))
    eps = 1e-7
    slope = (float(cell.ocv_at(x[0] + eps, temp_c)) - float(cell.ocv_at(x[0] - eps, temp_c))) / (
        2 * eps
    )
    h = np.array([[slope, 1.0, 1.0]])
    model_v = abs(r0 * current_a) + abs(x[1]) + abs(x[2])
    r = (
        t.voltage_noise_v**2
        + (r0 * t.current_noise_a) ** 2
        + (t.impedance_error_ratio * model_v) ** 2
    )
    innovation = voltage_v - (ocv + x[1] + x[2] + r0 * current_a)
    s = (h @ p @ h.T).item() + r
    k = (p @ h.T / s).ravel()
    x = x + k * innovation
    a = np.eye(3) - np.outer(k, h)
    p = a @ p @ a.T + r * np.outer(k, k)
    return x, p, innovation, math.sqrt(s)


def test_ekf_step_matches_the_dense_textbook_filter(linear):
    rng = np.random.default_rng(3)
    for _ in range(20):
        x0 = np.array([rng.uniform(0.1, 0.9), rng.normal(0, 0.01), rng.normal(0, 0.01)])
        m = rng.normal(size=(3, 3)) * 0.01
        p0 = m @ m.T + np.diag([1e-3, 1e-5, 1e-5])
        previous_a, current_a = rng.normal(0, 2, size=2)
        voltage_v, temp_c, dt_s = rng.uniform(3.1, 3.9), rng.uniform(0, 40), rng.uniform(0.01, 2)
        x_ref, p_ref, e_ref, s_ref = reference_ekf(
            linear, x0, p0, previous_a, current_a, voltage_v, temp_c, dt_s
        )
        x, p = x0[None].copy(), p0[None].copy()
        # random voltages lie far from the model: past the gate's hold, so the update is taken
        gate_expired = np.array([[0.0, 0.0, GATE_HOLD_S]])
        e, s = run_ekf(
            linear, x, p, [previous_a], [current_a], [voltage_v], [temp_c], dt_s, gate_expired
        )
        assert x[0] == pytest.approx(x_ref, rel=1e-6, abs=1e-9)
        assert p[0] == pytest.approx(p_ref, rel=1e-6, abs=1e-12)
        assert (e[0], s[0]) == pytest.approx((e_ref, s_ref), rel=1e-6)


def test_covariance_stays_symmetric_positive_definite_through_bad_data(generic):
    """Random currents, voltages far from the model, NaN readings and long gaps."""
    rng = np.random.default_rng(7)
    n = 8
    x = np.zeros((n, 3))
    x[:, 0] = rng.uniform(0, 1, n)
    p = np.tile(np.diag([0.01, 1e-4, 1e-4]), (n, 1, 1))
    previous = np.zeros(n)
    for _ in range(3000):
        current = rng.normal(0, 20, n)
        voltage = rng.uniform(2.0, 4.5, n)
        voltage[rng.random(n) < 0.1] = math.nan
        current[rng.random(n) < 0.05] = math.nan
        run_ekf(
            generic,
            x,
            p,
            previous,
            current,
            voltage,
            rng.uniform(-20, 60, n),
            float(rng.choice([0.001, 0.1, 30.0])),
        )
        previous = current
        assert np.array_equal(p, np.transpose(p, (0, 2, 1)))
        assert np.linalg.eigvalsh(p).min() > 0.0
        assert np.all((x[:, 0] >= -0.05) & (x[:, 0] <= 1.05))
    assert np.all(np.isfinite(x))


def test_a_nan_voltage_skips_the_update_and_grows_the_uncertainty(generic):
    x = np.array([[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])
    p = np.tile(np.diag([1e-4, 1e-6, 1e-6]), (2, 1, 1))
    gate_expired = np.array([[0.0, 0.0, GATE_HOLD_S]] * 2)
    e, s = run_ekf(
        generic, x, p, [-5.0, -5.0], [-5.0, -5.0], [math.nan, 3.5], [25, 25], 1.0, gate_expired
    )
    assert math.isnan(e[0]) and math.isnan(s[0]) and not math.isnan(e[1])
    assert x[0, 0] == pytest.approx(0.5 - 5.0 / (3600.0 * 5.0))  # prediction only
    assert p[0, 0, 0] > 1e-4 > p[1, 0, 0]


@pytest.mark.parametrize("dt_s", [0.1, 1.0])
def test_the_polarisation_error_fades_in_and_settles_at_its_rms_at_any_rate(generic, dt_s):
    """With no reading to correct it, each branch's error is a Gauss-Markov process of rms
    polarisation_error_v and the branch's own time constant: from a known state its
    variance rises as sigma^2 (1 - e^(-2t/tau)), the same at any loop rate, and settles at
    sigma^2 (never walking on). The current sensor's noise is set to zero here, so only
    this term moves the branches' variances."""
    cell = dataclasses.replace(generic, tuning=generic.tuning._replace(current_noise_a=0.0))
    sigma2 = cell.tuning.polarisation_error_v**2
    z = cell.impedance_at(0.5, 25.0)
    tau_s = np.array([z["r1_ohm"] * z["c1_f"], z["r2_ohm"] * z["c2_f"]])
    x, p = np.array([[0.5, 0.0, 0.0]]), np.zeros((1, 3, 3))
    steps = round(tau_s[1] / dt_s)
    for n in range(1, 5 * steps + 1):
        run_ekf(cell, x, p, [0.0], [0.0], [math.nan], [25.0], dt_s)
        if n == steps:
            expected = sigma2 * -np.expm1(-2.0 * n * dt_s / tau_s)
            assert np.diag(p[0])[1:] == pytest.approx(expected, rel=1e-6)
    assert np.diag(p[0])[1:] == pytest.approx([sigma2, sigma2], rel=1e-4)
    assert p[0, 0, 1] == p[0, 0, 2] == p[0, 1, 2] == 0.0


@pytest.mark.parametrize("dt_s", [0.01, 0.1, 1.0])
def test_an_unknown_current_makes_the_soc_unknown_within_minutes_at_any_rate(generic, dt_s):
    """Without the current, the SOC holds its value but not its certainty: a 1C current could
    have flowed, so its standard deviation grows like sqrt(t / 1 h) whatever the loop's rate."""
    x = np.array([[0.5, 0.0, 0.0]])
    p = np.diag([1e-6, 1e-6, 1e-6])[None].copy()
    for _ in range(round(36.0 / dt_s)):
        run_ekf(generic, x, p, [math.nan], [math.nan], [3.74], [25.0], dt_s)
    assert x[0, 0] == 0.5
    assert math.sqrt(p[0, 0, 0]) == pytest.approx(0.1, rel=0.02)  # sqrt(36 s / 3600 s)
    for _ in range(round(1800.0 / dt_s)):
        run_ekf(generic, x, p, [math.nan], [math.nan], [math.nan], [25.0], dt_s)
    assert p[0, 0, 0] == pytest.approx(0.25)  # capped at "unknown"


def settled_cells(cell, n: int, soc: float, current_a: float):
    """n cells that have tracked a steady current at ``soc`` for a while: state, covariance,
    gate timers, and the voltage the model says they read."""
    x = np.zeros((n, 3))
    x[:, 0] = soc
    p = np.tile(np.diag([0.02**2, 1e-6, 1e-6]), (n, 1, 1))
    update = np.zeros((n, 3))
    z = np.empty(5)
    ecm.impedance(cell.tables, soc, 25.0, z)
    ocv, _ = ecm.ocv_and_slope(cell.tables, soc, 25.0)
    voltage_v = ocv + z[ecm.R0] * current_a
    for _ in range(50):
        run_ekf(
            cell, x, p, [current_a] * n, [current_a] * n, [voltage_v] * n, [25.0] * n, 0.1, update
        )
    return x, p, update, voltage_v


def test_one_sample_far_from_the_prediction_is_held_back(generic):
    """A sample taken across a load step (the current of one instant, the voltages of another)
    reads 0.2 V off: believed at once it would move the SOC by tenths with a small sigma."""
    x, p, update, voltage_v = settled_cells(generic, 3, 0.8, 0.0)
    soc_before = x[:, 0].copy()
    e, s = run_ekf(
        generic, x, p, [0.0] * 3, [0.0] * 3, [voltage_v - 0.2] * 3, [25.0] * 3, 0.1, update
    )
    assert np.all(np.abs(e) > INNOVATION_GATE_SIGMA * s)  # reported as it is, for diagnosis
    assert x[:, 0] == pytest.approx(soc_before, abs=1e-9)  # but not believed
    run_ekf(generic, x, p, [0.0] * 3, [0.0] * 3, [voltage_v] * 3, [25.0] * 3, 0.1, update)
    assert x[:, 0] == pytest.approx(soc_before, abs=1e-4) and np.all(update[:, 2] == 0.0)


def test_a_voltage_that_stays_far_off_is_taken_after_the_hold(generic):
    x, p, update, voltage_v = settled_cells(generic, 1, 0.8, 0.0)
    steps_held = 0
    while x[0, 0] == pytest.approx(0.8, abs=1e-6):
        run_ekf(generic, x, p, [0.0], [0.0], [voltage_v - 0.1], [25.0], 0.1, update)
        steps_held += 1
        assert steps_held < 100
    # held for GATE_HOLD_S (ten steps of 0.1 s add up to a hair under 1 s), then taken
    assert round(GATE_HOLD_S / 0.1) + 1 <= steps_held <= round(GATE_HOLD_S / 0.1) + 2
    soc_after_first = x[0, 0]
    run_ekf(generic, x, p, [0.0], [0.0], [voltage_v - 0.1], [25.0], 0.1, update)
    assert x[0, 0] < soc_after_first  # and taken again while it stays far off


def test_a_voltage_that_drifts_out_slowly_is_never_held_back(generic):
    """Model mismatch (a cold or aged cell) moves the innovation a little each sample: past
    5 sigma it is still the truth, and holding it back would only let the SOC error grow."""
    x, p, update, voltage_v = settled_cells(generic, 1, 0.8, 0.0)
    drifted_out = False
    for step in range(1, 100):  # 3 mV a step: a few sigma out within 2 s
        soc_before = x[0, 0]
        e, s = run_ekf(generic, x, p, [0.0], [0.0], [voltage_v - 0.003 * step], [25.0], 0.1, update)
        assert update[0, 2] == 0.0, f"held back at step {step}"
        if abs(e[0]) > INNOVATION_GATE_SIGMA * s[0]:
            drifted_out = True
            assert x[0, 0] < soc_before  # taken
    assert drifted_out, "the drift never left the gate: the test proves nothing"


def test_cells_are_independent(generic):
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.uniform(0.2, 0.8, 3), np.zeros(3), np.zeros(3)])
    p = np.tile(np.diag([1e-3, 1e-5, 1e-5]), (3, 1, 1))
    args = ([-3.0, 2.0, 0.0], [-4.0, 1.0, 0.5], [3.6, 3.9, 3.7], [10.0, 25.0, 40.0])
    x_all, p_all = x.copy(), p.copy()
    run_ekf(generic, x_all, p_all, *args, 0.5)
    for c in range(3):
        x_one, p_one = x[c : c + 1].copy(), p[c : c + 1].copy()
        run_ekf(generic, x_one, p_one, *([a[c]] for a in args), 0.5)
        assert np.array_equal(x_one[0], x_all[c]) and np.array_equal(p_one[0], p_all[c])


def limits_for(cell, state, temp_c, durations=(2.0, 10.0, 30.0), cap_a=1000.0):
    x = np.atleast_2d(np.asarray(state, float))
    n = x.shape[0]
    charge, discharge = np.empty((n, len(durations))), np.empty((n, len(durations)))
    power_limits(
        tuple(cell.tables),
        tuple(cell.power_map),
        np.full(n, cell.capacity_ah),
        x,
        np.full(n, temp_c, dtype=float),
        cell.voltage_min_v,
        cell.voltage_max_v,
        cap_a,
        np.array(durations),
        0,
        n,
        charge,
        discharge,
    )
    return charge[0], discharge[0]


def end_voltage(cell, soc, temp_c, current_a, duration_s):
    """Terminal voltage at the end of a constant-current pulse from rest, finely stepped."""
    n = int(duration_s / 0.01) + 1
    v, _ = ecm.simulate(
        cell.tables,
        cell.capacity_ah,
        soc,
        np.full(n, current_a),
        np.full(n, float(temp_c)),
        np.full(n, 0.01),
    )
    return v


@pytest.mark.parametrize(("soc", "temp_c"), [(0.2, 25.0), (0.5, 0.0), (0.85, 40.0)])
def test_power_limit_puts_the_cell_at_its_voltage_limit(generic, soc, temp_c):
    charge, discharge = limits_for(generic, [soc, 0.0, 0.0], temp_c)
    for d, duration in enumerate((2.0, 10.0, 30.0)):
        # At the limit, never past it (3 mV for the fine-stepped reference); short of it by
        # at most 15 mV, where the impedance changes over the pulse and the safer of the two
        # solutions is taken.
        v = end_voltage(generic, soc, temp_c, -discharge[d], duration)
        assert generic.voltage_min_v - 3e-3 < v.min() < generic.voltage_min_v + 15e-3
        v = end_voltage(generic, soc, temp_c, charge[d], duration)
        assert generic.voltage_max_v - 15e-3 < v.max() < generic.voltage_max_v + 3e-3
    assert discharge[0] > discharge[1] > discharge[2] > 0.0
    assert charge[0] > charge[1] > charge[2] > 0.0


def test_power_limits_know_the_cold_the_edges_and_the_cap(generic):
    warm = limits_for(generic, [0.5, 0.0, 0.0], 25.0)[1]
    cold = limits_for(generic, [0.5, 0.0, 0.0], 0.0)[1]
    assert np.all(cold < 0.6 * warm)
    # Polarised by a discharge just now: less headroom than from rest.
    assert np.all(limits_for(generic, [0.5, -0.05, -0.05], 25.0)[1] < warm)
    # Past a voltage limit at zero current: nothing in that direction.
    charge, discharge = limits_for(generic, [1.0, 0.05, 0.0], 25.0)
    assert np.all(charge == 0.0) and np.all(discharge > 0.0)
    charge, discharge = limits_for(generic, [0.0, -0.05, 0.0], 25.0)
    assert np.all(discharge == 0.0)
    assert np.all(limits_for(generic, [0.5, 0.0, 0.0], 25.0, cap_a=7.0)[0] == 7.0)


def test_an_improbable_innovation_is_followed_to_where_the_ocv_puts_the_cell(generic):
    """Believed at 0.65 +- 0.3, the rested cell reads the OCV of 0.95: the OCV curve bends
    between the two, so a single linearised step stops short; the iterated one does not."""
    x = np.array([[0.65, 0.0, 0.0]])
    p = np.diag([0.09, 1e-6, 1e-6])[None].copy()
    voltage = float(generic.ocv_at(0.95))
    innovation, std = run_ekf(generic, x, p, [0.0], [0.0], [voltage], [25.0], 0.1)
    assert innovation[0] == pytest.approx(voltage - float(generic.ocv_at(0.65)))
    assert std[0] > 0.25  # reported against the prior's prediction
    assert x[0, 0] == pytest.approx(0.95, abs=0.005)
    assert np.linalg.eigvalsh(p[0]).min() > 0.0 and p[0, 0, 0] < 0.01**2
