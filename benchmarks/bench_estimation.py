"""Cost of one EKF step of the whole pack, against filterpy and plain NumPy in the same process.

For 16, 96, 192 and 1000 cells, the time of one step of:

- ``ekf``: ``bms.estimation.ekf.ekf_step``, the Numba kernel, called from Python as the loop
  calls it, with the generic_nmc tables (impedance over SOC x temperature), a measured dt
  jittering around 10 ms, a drive-cycle current and voltages from the ECM plant plus noise;
- ``estimator``: ``PackEstimator.step``, the full per-cycle cost in a 10 ms loop (EKF, the
  state of power of the cells due this cycle, wrapper);
- ``power``: ``bms.estimation.power.power_limits`` alone, for every cell, on the EKF's states;
- ``power_map``: the same from the power map of models/ecm/lgm50_pybamm (pulses from rest at
  13 currents, 14 SOC levels, 3 temperatures) instead of the 2RC model's closed form;
- ``numpy``: the same EKF vectorised over cells in plain NumPy, with the same table lookups;
- ``filterpy``: one ``filterpy.kalman.ExtendedKalmanFilter`` per cell (what a Python user would
  pick) with constant impedance, which is cheaper than our lookups and so favours filterpy.

Before timing, the benchmark checks that ekf_step, NumPy and filterpy compute the same thing:
from one start, with tables of a single impedance row (so all three run the same model), the
SOCs after some hundred steps must agree within 1e-6; NumPy must also match ekf_step on the full
tables. A speed ratio between different computations would say nothing.

Each figure is the median over ``--repeats`` runs of many steps (fewer for slow cases, so each
run takes about ``--repeat-s``), after a warm-up, with the garbage collector off (as timeit).
Two fresh processes with an empty ``NUMBA_CACHE_DIR`` give the kernels' compile time (first
result of ``bms.estimation.estimator.warm_up``), the load-from-cache time, and the RSS after
warm-up. Run from the repository root (about a minute, at most 3)::

    .venv/bin/python benchmarks/bench_estimation.py
    .venv/bin/python benchmarks/bench_estimation.py --json   # last stdout line: one JSON object
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import llvmlite.binding
import numba
import numpy as np
from filterpy.kalman import ExtendedKalmanFilter

from bms.estimation import ecm
from bms.estimation.cell_params import CellParams, EkfTuning, load_cell_params
from bms.estimation.ecm import C1, C2, R0, R1, R2, SECONDS_PER_HOUR, EcmTables
from bms.estimation.ekf import (
    MAX_SOC_VARIANCE,
    SOC_STATE_LIMITS,
    UNKNOWN_CURRENT_C_RATE,
    ekf_step,
)
from bms.estimation.estimator import INITIAL_RC_STD_V, POWER_CAP_C_RATE, PackEstimator
from bms.estimation.power import power_limits
from bms.types import POWER_DURATIONS_S

REPO_DIR = Path(__file__).resolve().parents[1]
CELL_DIR = REPO_DIR / "models" / "ecm" / "generic_nmc"
MAP_CELL_DIR = REPO_DIR / "models" / "ecm" / "lgm50_pybamm"
"""A set with a power map, for ``power_map``."""
SIZES = (16, 96, 192, 1000)
PERIOD_S = 0.01
N_SAMPLES = 1000
"""Length of the input ring (10 s at 100 Hz); long runs go round it."""
CHECK_CELLS = 96
CHECK_STEPS = 300
CHECK_TOLERANCE = 1e-6
TARGET_RATIO_96 = 300.0
CELLS_PER_SENSOR = 8
IMPLS = ("ekf", "estimator", "power", "power_map", "numpy", "filterpy")

WARM_UP_CODE = """
import json, sys, time
t0 = time.perf_counter()
from bms.estimation.cell_params import load_cell_params
from bms.estimation.estimator import warm_up
cell = load_cell_params(sys.argv[1])
t1 = time.perf_counter()
warm_up(cell)
t2 = time.perf_counter()
with open("/proc/self/status") as f:
    rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
print(json.dumps({"import_s": t1 - t0, "warm_up_s": t2 - t1, "rss_mib": rss_kib / 1024}))
"""


class Inputs:
    """A pack's measurements as the loop sees them, precomputed so a timed step only indexes.

    Rows of (N_SAMPLES, n_cells) arrays, kept as lists of views: slicing inside the timed loop
    would be timed too. Voltages come from the ECM plant with the full tables plus 2 mV noise.
    """

    def __init__(self, cell: CellParams, n_cells: int, seed: int):
        rng = np.random.default_rng(seed)
        t_s = np.arange(N_SAMPLES) * PERIOD_S
        # Discharge bursts up to 3C and regen pulses (5 Ah cell), so both signs occur.
        pack_a = -4.0 + 6.0 * np.sin(2 * np.pi * t_s / 3.7) + 5.0 * np.sign(np.sin(t_s * 2.3))
        self.dt_s = np.clip(PERIOD_S + rng.normal(0.0, 3e-4, N_SAMPLES), 0.008, 0.012)
        self.pack_current_a = pack_a
        n_sensors = max(1, n_cells // CELLS_PER_SENSOR)
        self.sensor_temp_c = rng.uniform(20.0, 35.0, n_sensors)
        self.temp_c = self.sensor_temp_c[(np.arange(n_cells) * n_sensors) // n_cells]
        self.true_soc0 = rng.uniform(0.25, 0.85, n_cells)
        voltage_v = np.empty((N_SAMPLES, n_cells))
        for c in range(n_cells):
            voltage_v[:, c], _ = ecm.simulate(
                cell.tables,
                cell.capacity_ah,
                self.true_soc0[c],
                pack_a,
                np.full(N_SAMPLES, self.temp_c[c]),
                self.dt_s,
            )
        voltage_v += rng.normal(0.0, 0.002, voltage_v.shape)
        current_a = np.ascontiguousarray(np.broadcast_to(pack_a[:, None], voltage_v.shape))
        self.current_rows = list(current_a)
        self.voltage_rows = list(voltage_v)
        self.dt_list = self.dt_s.tolist()
        self.pack_current_list = pack_a.tolist()
        # The filters start a little off (0.3 % SOC), so their updates have work to do; under
        # 1 % a step, so ekf_step's iterated update (for large corrections) stays out of it
        # and all implementations run the same single-step math, as in steady operation.
        self.soc0 = np.clip(self.true_soc0 + rng.normal(0.0, 0.003, n_cells), 0.0, 1.0)
        self.capacity_ah = np.full(n_cells, cell.capacity_ah)


def initial_covariance(tuning: EkfTuning, n_cells: int) -> np.ndarray:
    """P of every cell at the start, as PackEstimator.set_soc sets it: (n_cells, 3, 3)."""
    std = [tuning.initial_soc_std, INITIAL_RC_STD_V, INITIAL_RC_STD_V]
    return np.tile(np.diag(np.square(std)), (n_cells, 1, 1))


def constant_tables(cell: CellParams, temp_c: float = 25.0, soc: float = 0.5) -> EcmTables:
    """The cell's tables reduced to one OCV curve and one impedance row, at (temp_c, soc)."""
    t = cell.tables
    it = int(np.argmin(np.abs(t.ocv_temp_c - temp_c)))
    jt = int(np.argmin(np.abs(t.imp_temp_c - temp_c)))
    js = int(np.argmin(np.abs(t.imp_soc - soc)))
    return EcmTables(
        t.ocv_soc.copy(),
        t.ocv_temp_c[it : it + 1].copy(),
        t.ocv_v[it : it + 1].copy(),
        t.imp_soc[js : js + 1].copy(),
        t.imp_temp_c[jt : jt + 1].copy(),
        t.impedance[jt : jt + 1, js : js + 1].copy(),
    )


class NumbaEkf:
    """ekf_step over all cells, called exactly as PackEstimator calls it."""

    def __init__(self, cell: CellParams, tables: EcmTables, inputs: Inputs):
        n = inputs.soc0.size
        self.cell, self.inputs = cell, inputs
        self.tables, self.tuning = tuple(tables), tuple(cell.tuning)
        self.x = np.zeros((n, 3))
        self.x[:, 0] = inputs.soc0
        self.p = initial_covariance(cell.tuning, n)
        self.update = np.zeros((n, 3))

    def step(self, k: int) -> None:
        inp = self.inputs
        j = k % N_SAMPLES
        ekf_step(
            self.tables,
            self.tuning,
            inp.capacity_ah,
            self.x,
            self.p,
            inp.current_rows[j - 1],
            inp.current_rows[j],
            inp.voltage_rows[j],
            inp.temp_c,
            inp.dt_list[j],
            self.update,
        )


def _bracket(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ecm._bracket for many points: index and weight, clamped at the grid's ends."""
    if grid.size == 1:
        return np.zeros(x.shape, np.intp), np.zeros(x.shape)
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    w = np.clip((x - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
    return i, w


class NumpyEkf:
    """The same EKF as ekf_step, vectorised over cells: x (n, 3), p (n, 3, 3), Joseph form.

    Written the way a careful NumPy user would (batched matmul, no Python loop over cells),
    with the same bilinear table lookups and NaN handling, so it is the baseline that says
    what compiling buys over vectorising.
    """

    def __init__(self, cell: CellParams, tables: EcmTables, inputs: Inputs):
        n = inputs.soc0.size
        self.tuning, self.tables, self.inputs = cell.tuning, tables, inputs
        self.x = np.zeros((n, 3))
        self.x[:, 0] = inputs.soc0
        self.p = initial_covariance(cell.tuning, n)
        self.eye = np.eye(3)

    def _impedance(self, soc: np.ndarray, temp_c: np.ndarray) -> np.ndarray:
        t = self.tables
        it, wt = _bracket(t.imp_temp_c, temp_c)
        jt = np.minimum(it + 1, t.imp_temp_c.size - 1)
        i, w = _bracket(t.imp_soc, soc)
        j = np.minimum(i + 1, t.imp_soc.size - 1)
        w, wt = w[:, None], wt[:, None]
        table = t.impedance
        low_t = table[it, i] * (1.0 - w) + table[it, j] * w
        high_t = table[jt, i] * (1.0 - w) + table[jt, j] * w
        return low_t * (1.0 - wt) + high_t * wt

    def _ocv_and_slope(self, soc: np.ndarray, temp_c: np.ndarray):
        t = self.tables
        grid = t.ocv_soc
        it, wt = _bracket(t.ocv_temp_c, temp_c)
        jt = np.minimum(it + 1, t.ocv_temp_c.size - 1)
        i, w = _bracket(grid, soc)
        lo = t.ocv_v[it, i] * (1.0 - wt) + t.ocv_v[jt, i] * wt
        hi = t.ocv_v[it, i + 1] * (1.0 - wt) + t.ocv_v[jt, i + 1] * wt
        inside = (grid[0] < soc) & (soc < grid[-1])
        slope = np.where(inside, (hi - lo) / (grid[i + 1] - grid[i]), 0.0)
        return lo + (hi - lo) * w, slope

    def step(self, k: int) -> None:
        inp, tuning, x, p = self.inputs, self.tuning, self.x, self.p
        j = k % N_SAMPLES
        dt_s = inp.dt_list[j]
        previous_a, current_a, voltage_v = (
            inp.current_rows[j - 1],
            inp.current_rows[j],
            inp.voltage_rows[j],
        )
        current_var = tuning.current_noise_a**2
        z = self._impedance(x[:, 0], inp.temp_c)
        a1 = np.exp(-dt_s / (z[:, R1] * z[:, C1]))
        a2 = np.exp(-dt_s / (z[:, R2] * z[:, C2]))
        f = np.stack([np.ones_like(a1), a1, a2], axis=1)
        b = np.stack(
            [
                dt_s / (SECONDS_PER_HOUR * inp.capacity_ah),
                z[:, R1] * (1.0 - a1),
                z[:, R2] * (1.0 - a2),
            ],
            axis=1,
        )
        i_step = np.where(
            np.isnan(previous_a),
            current_a,
            np.where(np.isnan(current_a), previous_a, 0.5 * (previous_a + current_a)),
        )
        unknown = np.isnan(i_step)
        input_var = np.where(unknown, (UNKNOWN_CURRENT_C_RATE * inp.capacity_ah) ** 2, current_var)
        i_step = np.where(unknown, 0.0, i_step)

        x[:] = f * x + b * i_step[:, None]
        np.clip(x[:, 0], *SOC_STATE_LIMITS, out=x[:, 0])
        p[:] = (
            f[:, :, None] * p * f[:, None, :] + (b * input_var[:, None])[:, :, None] * b[:, None, :]
        )
        p[:, 0, 0] = np.minimum(
            p[:, 0, 0] + tuning.soc_random_walk_per_sqrt_h**2 * dt_s / SECONDS_PER_HOUR,
            MAX_SOC_VARIANCE,
        )
        p[:, 1, 1] += tuning.polarisation_error_v**2 * (1.0 - a1**2)
        p[:, 2, 2] += tuning.polarisation_error_v**2 * (1.0 - a2**2)

        valid = ~(np.isnan(voltage_v) | np.isnan(current_a))
        z = self._impedance(x[:, 0], inp.temp_c)
        ocv, slope = self._ocv_and_slope(x[:, 0], inp.temp_c)
        h = np.stack([slope, np.ones_like(slope), np.ones_like(slope)], axis=1)
        impedance_v = np.abs(z[:, R0] * current_a) + np.abs(x[:, 1]) + np.abs(x[:, 2])
        noise_var = (
            tuning.voltage_noise_v**2
            + z[:, R0] ** 2 * current_var
            + (tuning.impedance_error_ratio * impedance_v) ** 2
        )
        innovation = voltage_v - (ocv + x[:, 1] + x[:, 2] + z[:, R0] * current_a)
        ph = np.einsum("nrs,ns->nr", p, h)
        s_var = noise_var + np.einsum("nr,nr->n", h, ph)
        gain = ph / s_var[:, None]
        x_new = x + gain * innovation[:, None]
        np.clip(x_new[:, 0], *SOC_STATE_LIMITS, out=x_new[:, 0])
        a = self.eye - gain[:, :, None] * h[:, None, :]
        p_new = (
            a @ p @ a.transpose(0, 2, 1)
            + (gain * noise_var[:, None])[:, :, None] * gain[:, None, :]
        )
        x[:] = np.where(valid[:, None], x_new, x)
        p[:] = np.where(valid[:, None, None], p_new, p)


class FilterpyEkf:
    """One filterpy ExtendedKalmanFilter per cell, with constant impedance and the OCV table.

    F, B and Q are built once per step and shared by every cell (valid here: one impedance,
    one capacity, one dt), which spares filterpy work a per-cell model would need.
    """

    def __init__(self, cell: CellParams, tables: EcmTables, inputs: Inputs):
        if tables.imp_soc.size != 1 or tables.imp_temp_c.size != 1 or tables.ocv_v.shape[0] != 1:
            raise ValueError("filterpy runs the constant-impedance model: use constant_tables()")
        self.tuning, self.inputs = cell.tuning, inputs
        self.z = tables.impedance[0, 0]
        self.ocv_soc = tables.ocv_soc
        self.ocv_v = tables.ocv_v[0]
        self.ocv_slope = np.diff(self.ocv_v) / np.diff(self.ocv_soc)
        p0 = initial_covariance(cell.tuning, 1)[0]
        self.filters = []
        for soc in inputs.soc0:
            f = ExtendedKalmanFilter(dim_x=3, dim_z=1, dim_u=1)
            f.x = np.array([[soc], [0.0], [0.0]])
            f.P = p0.copy()
            self.filters.append(f)

    def _jacobian(self, x: np.ndarray) -> np.ndarray:
        soc = x[0, 0]
        grid = self.ocv_soc
        if grid[0] < soc < grid[-1]:
            slope = self.ocv_slope[np.searchsorted(grid, soc, side="right") - 1]
        else:
            slope = 0.0
        return np.array([[slope, 1.0, 1.0]])

    def _hx(self, x: np.ndarray, current_a: float) -> np.ndarray:
        ocv = np.interp(x[0, 0], self.ocv_soc, self.ocv_v)
        return np.array([[ocv + x[1, 0] + x[2, 0] + self.z[R0] * current_a]])

    def step(self, k: int) -> None:
        inp, tuning, z = self.inputs, self.tuning, self.z
        j = k % N_SAMPLES
        dt_s = inp.dt_list[j]
        current_a = inp.pack_current_list[j]
        i_step = 0.5 * (inp.pack_current_list[j - 1] + current_a)
        a1 = math.exp(-dt_s / (z[R1] * z[C1]))
        a2 = math.exp(-dt_s / (z[R2] * z[C2]))
        big_f = np.diag([1.0, a1, a2])
        big_b = np.array(
            [
                [dt_s / (SECONDS_PER_HOUR * inp.capacity_ah[0])],
                [z[R1] * (1 - a1)],
                [z[R2] * (1 - a2)],
            ]
        )
        current_var = tuning.current_noise_a**2
        walk = np.diag(
            [
                tuning.soc_random_walk_per_sqrt_h**2 * dt_s / SECONDS_PER_HOUR,
                tuning.polarisation_error_v**2 * (1.0 - a1**2),
                tuning.polarisation_error_v**2 * (1.0 - a2**2),
            ]
        )
        big_q = big_b @ big_b.T * current_var + walk
        base_var = tuning.voltage_noise_v**2 + z[R0] ** 2 * current_var
        voltage_v = inp.voltage_rows[j]
        for c, f in enumerate(self.filters):
            f.F, f.B, f.Q = big_f, big_b, big_q
            f.predict(u=i_step)
            f.x[0, 0] = min(max(f.x[0, 0], SOC_STATE_LIMITS[0]), SOC_STATE_LIMITS[1])
            f.P[0, 0] = min(f.P[0, 0], MAX_SOC_VARIANCE)
            impedance_v = abs(z[R0] * current_a) + abs(f.x[1, 0]) + abs(f.x[2, 0])
            noise_var = base_var + (tuning.impedance_error_ratio * impedance_v) ** 2
            f.update(voltage_v[c], self._jacobian, self._hx, R=noise_var, hx_args=(current_a,))
            f.x[0, 0] = min(max(f.x[0, 0], SOC_STATE_LIMITS[0]), SOC_STATE_LIMITS[1])

    @property
    def soc(self) -> np.ndarray:
        return np.array([f.x[0, 0] for f in self.filters])


class Estimator:
    """PackEstimator.step: the EKF, state of power and the wrapper, as the loop runs it."""

    def __init__(self, cell: CellParams, inputs: Inputs):
        n = inputs.soc0.size
        self.inputs = inputs
        self.estimator = PackEstimator(
            cell,
            n,
            inputs.sensor_temp_c.size,
            rest_current_a=0.5,
            rest_time_s=1800.0,
            period_s=PERIOD_S,
        )
        self.estimator.set_soc(inputs.soc0)

    def step(self, k: int) -> None:
        inp = self.inputs
        j = k % N_SAMPLES
        self.estimator.step(
            inp.pack_current_list[j], inp.voltage_rows[j], inp.sensor_temp_c, inp.dt_list[j]
        )


class Power:
    """power_limits alone, on the states the EKF reached (so Newton starts where it would)."""

    def __init__(self, cell: CellParams, inputs: Inputs, x: np.ndarray):
        n = inputs.soc0.size
        self.cell, self.inputs, self.x = cell, inputs, x.copy()
        self.tables = tuple(cell.tables)
        self.power_map = tuple(cell.power_map)
        self.durations_s = np.array(POWER_DURATIONS_S)
        self.charge_a = np.empty((n, self.durations_s.size))
        self.discharge_a = np.empty((n, self.durations_s.size))

    def step(self, k: int) -> None:
        cell = self.cell
        power_limits(
            self.tables,
            self.power_map,
            self.inputs.capacity_ah,
            self.x,
            self.inputs.temp_c,
            cell.voltage_min_v,
            cell.voltage_max_v,
            POWER_CAP_C_RATE * cell.capacity_ah,
            self.durations_s,
            0,
            self.x.shape[0],
            self.charge_a,
            self.discharge_a,
        )


def check_agreement(cell: CellParams, seed: int) -> dict[str, float]:
    """Largest SOC difference after CHECK_STEPS steps: ekf_step vs NumPy vs filterpy on the
    constant tables, and ekf_step vs NumPy on the full tables."""
    inputs = Inputs(cell, CHECK_CELLS, seed)
    constant = constant_tables(cell)
    ekf, numpy_ekf = NumbaEkf(cell, constant, inputs), NumpyEkf(cell, constant, inputs)
    fp = FilterpyEkf(cell, constant, inputs)
    ekf_full, numpy_full = NumbaEkf(cell, cell.tables, inputs), NumpyEkf(cell, cell.tables, inputs)
    for k in range(1, CHECK_STEPS + 1):
        for impl in (ekf, numpy_ekf, fp, ekf_full, numpy_full):
            impl.step(k)
    soc = ekf.x[:, 0]
    return {
        "soc_moved": float(np.max(np.abs(soc - inputs.soc0))),
        "numpy_vs_ekf": float(np.max(np.abs(numpy_ekf.x[:, 0] - soc))),
        "filterpy_vs_ekf": float(np.max(np.abs(fp.soc - soc))),
        "numpy_vs_ekf_full_tables": float(np.max(np.abs(numpy_full.x[:, 0] - ekf_full.x[:, 0]))),
    }


def time_per_step_us(
    steps: dict[str, Callable[[int], None]], repeats: int, repeat_s: float, max_steps: int
) -> dict[str, tuple[float, int]]:
    """Median time of one step (µs) of each implementation, and the steps per run.

    Each implementation's steps per run come from its warm-up, so that a run takes about
    ``repeat_s``. The runs are interleaved (one of each per round), so a change in the
    machine's load hits every implementation alike and the ratios stay fair.
    """
    k = dict.fromkeys(steps, 1)
    n_steps = {}
    for name, step in steps.items():
        warm_ns = warm_steps = 0
        while warm_steps < 3 or (warm_ns < 0.2 * repeat_s * 1e9 and warm_steps < max_steps):
            t0 = time.perf_counter_ns()
            step(k[name])
            warm_ns += time.perf_counter_ns() - t0
            warm_steps += 1
            k[name] += 1
        n_steps[name] = int(min(max(repeat_s * 1e9 * warm_steps / warm_ns, 3), max_steps))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, step in steps.items():
                n, first = n_steps[name], k[name]
                t0 = time.perf_counter_ns()
                for i in range(first, first + n):
                    step(i)
                samples[name].append((time.perf_counter_ns() - t0) / n / 1e3)
                k[name] += n
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: (statistics.median(samples[name]), n_steps[name]) for name in steps}


def compile_and_cache_times() -> dict[str, float]:
    """Compile time, cache-load time and RSS from two fresh processes sharing an empty cache."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-numba-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", WARM_UP_CODE, str(CELL_DIR)],
                env=env,
                cwd=REPO_DIR,
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "compile_s": runs[0]["warm_up_s"],
        "cache_load_s": runs[1]["warm_up_s"],
        "rss_mib": runs[0]["rss_mib"],
        "rss_cached_mib": runs[1]["rss_mib"],
        "import_s": runs[1]["import_s"],
    }


def cpu_model() -> str:
    """The CPU's name as the kernel reports it: the compiled kernel's speed differs twofold
    between hosts whose Python speed is alike, so every run says which it ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--repeat-s", type=float, default=0.15, help="target time of one run")
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    args = parser.parse_args()

    started = time.perf_counter()
    cell = load_cell_params(CELL_DIR)
    map_cell = load_cell_params(MAP_CELL_DIR)
    print(
        f"Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}; LLVM targets "
        f"{llvmlite.binding.get_host_cpu_name()}); cell {cell.name}, "
        f"dt about {PERIOD_S * 1e3:g} ms (measured, jittered)"
    )

    check = check_agreement(cell, args.seed)
    worst = max(check["numpy_vs_ekf"], check["filterpy_vs_ekf"], check["numpy_vs_ekf_full_tables"])
    print(
        f"\nAgreement after {CHECK_STEPS} steps, {CHECK_CELLS} cells (SOC moved up to "
        f"{check['soc_moved']:.2e}): max |SOC difference| numpy vs ekf_step "
        f"{check['numpy_vs_ekf']:.1e}, filterpy vs ekf_step {check['filterpy_vs_ekf']:.1e} "
        f"(one impedance row); numpy vs ekf_step on the full tables "
        f"{check['numpy_vs_ekf_full_tables']:.1e}"
    )
    if not worst <= CHECK_TOLERANCE:
        print(f"FAILED: the implementations differ by more than {CHECK_TOLERANCE:g}")
        return 1

    results: dict[str, dict[str, float]] = {}
    steps: dict[tuple[int, str], int] = {}
    for n in args.sizes:
        inputs = Inputs(cell, n, args.seed)
        ekf = NumbaEkf(cell, cell.tables, inputs)
        impls: dict[str, Callable[[], object]] = {
            "ekf": lambda ekf=ekf: ekf,
            "estimator": lambda inputs=inputs: Estimator(cell, inputs),
            "power": lambda inputs=inputs, ekf=ekf: Power(cell, inputs, ekf.x),
            "power_map": lambda inputs=inputs, ekf=ekf: Power(map_cell, inputs, ekf.x),
            "numpy": lambda inputs=inputs: NumpyEkf(cell, cell.tables, inputs),
            "filterpy": lambda inputs=inputs: FilterpyEkf(cell, constant_tables(cell), inputs),
        }
        timed = time_per_step_us(
            {name: impls[name]().step for name in IMPLS},
            args.repeats,
            args.repeat_s,
            args.max_steps,
        )
        row = {name: us for name, (us, _) in timed.items()}
        steps.update({(n, name): n_run for name, (_, n_run) in timed.items()})
        results[str(n)] = {
            "ratio_vs_filterpy": row["filterpy"] / row["ekf"],
            "ratio_vs_numpy": row["numpy"] / row["ekf"],
            "ekf_us": row["ekf"],
            "filterpy_us": row["filterpy"],
            "numpy_us": row["numpy"],
            "estimator_us": row["estimator"],
            "power_us": row["power"],
            "power_map_us": row["power_map"],
        }
    dispatch_us, _ = time_per_step_us(
        {"ekf": NumbaEkf(cell, cell.tables, Inputs(cell, 0, args.seed)).step},
        args.repeats,
        args.repeat_s,
        args.max_steps,
    )["ekf"]
    compiled = compile_and_cache_times()

    print(
        "\nOne step of the whole pack (median of runs; ratios = other's time / this one's)\n"
        f"{'cells':>5} {'implementation':<20} {'steps/run':>9} {'µs/step':>10} "
        f"{'ns/cell-step':>12} {'filterpy/this':>13} {'numpy/this':>10}"
    )
    labels = {
        "ekf": "ekf_step (numba)",
        "estimator": "PackEstimator.step",
        "power": "power_limits",
        "power_map": "power_limits (map)",
        "numpy": "numpy vectorised",
        "filterpy": "filterpy EKF/cell",
    }
    for n in args.sizes:
        r = results[str(n)]
        for name in IMPLS:
            us = r[f"{name}_us"]
            print(
                f"{n:>5} {labels[name]:<20} {steps[n, name]:>9} {us:>10.1f} "
                f"{us * 1e3 / n:>12.0f} {r['filterpy_us'] / us:>13.1f} "
                f"{r['numpy_us'] / us:>10.2f}"
            )
    print(f"ekf_step with 0 cells (call and argument typing only): {dispatch_us:.1f} µs")

    print()
    if "96" in results:
        ratio = results["96"]["ratio_vs_filterpy"]
        verdict = "met" if ratio >= TARGET_RATIO_96 else "NOT met"
        print(
            f"Target ekf_step >= {TARGET_RATIO_96:g}x filterpy at 96 cells: {ratio:.0f}x, {verdict}"
        )
    if "1000" in results:
        r = results["1000"]
        budget_us = 0.01 * PERIOD_S * 1e6
        fits = "fits" if r["ekf_us"] <= budget_us else "does NOT fit"
        print(
            f"1000 cells: ekf_step {r['ekf_us']:.0f} µs {fits} in 1 % of a 10 ms cycle "
            f"({budget_us:.0f} µs); PackEstimator.step {r['estimator_us']:.0f} µs = "
            f"{r['estimator_us'] / (PERIOD_S * 1e6) * 100:.1f} % of 10 ms "
            f"(power_limits {r['power_us']:.0f} µs of it)"
        )
    print(
        f"Fresh process, empty NUMBA_CACHE_DIR: warm_up compiles in {compiled['compile_s']:.1f} s, "
        f"RSS after it {compiled['rss_mib']:.0f} MiB; second process loads from the cache in "
        f"{compiled['cache_load_s']:.2f} s (RSS {compiled['rss_cached_mib']:.0f} MiB, imports "
        f"{compiled['import_s']:.2f} s)"
    )
    print(f"Whole run {time.perf_counter() - started:.0f} s")
    if args.json:
        summary = {
            **results,
            "compile_s": compiled["compile_s"],
            "cache_load_s": compiled["cache_load_s"],
            "rss_mib": compiled["rss_mib"],
            "rss_cached_mib": compiled["rss_cached_mib"],
            "ekf_dispatch_us": dispatch_us,
            "check_max_soc_diff": worst,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
