#!/usr/bin/env python3
"""Generate physics "truth" data for SOC / SOP estimator identification and evaluation.

Run with the tool environment (PyBaMM is a build-time tool, never a run-time dependency):

    .venv-truth/bin/python models/ecm/truth/generate.py --out benchmarks/out/truth --jobs 2
    .venv-truth/bin/python models/ecm/truth/generate.py --out benchmarks/out/truth \
        --only us06_25C ocv_25C
    .venv-truth/bin/python models/ecm/truth/generate.py --out benchmarks/out/truth \
        --fixtures tests/data/truth

Model: PyBaMM DFN, Chen2020 parameters (LG M50, NMC811/graphite-SiOx), lumped thermal model,
ambient = initial temperature = the test temperature.  If the DFN fails on a file the job is
retried with the SPMe and the manifest says so.

Conventions (pybms): current_a > 0 is CHARGING (PyBaMM's current is positive on discharge; it is
negated exactly once, in `_frame`).  soc_true is a fraction in [0, 1] defined from the electrode
stoichiometries (ElectrodeSOHSolver at the 2.5 V / 4.2 V limits, zero current):
    soc_true = (x_avg - x_0) / (x_100 - x_0)
with x_avg the volume-averaged lithium stoichiometry of the negative electrode particles.  It is
NOT a coulomb count of the logged current.  time_s is seconds since the start of the test; a row's
current is the current applied from that row's time on (at a step change the row logged is the
one just after the change).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import itertools

import numpy as np

HERE = Path(__file__).resolve().parent
DRIVE_DIR = HERE / "drive_cycles"

SEED = 20240501
HEADER = "time_s,current_a,voltage_v,temp_c,soc_true"
V_MIN = 2.5
V_MAX = 4.2
HPPC_CHARGE_PULSE_V_MAX = 4.25  # charge pulses may overshoot 4.2 V slightly near full (see README)
PARAMETER_SET = "Chen2020"

# drive cycles: name -> (file, kind, target peak discharge current [A])
DRIVE_CYCLES = {
    "us06": ("US06.csv", "current", 10.0),  # ~2C peak discharge
    "udds": ("UDDS.csv", "current", 5.0),  # ~1C peak discharge
    "wltc": ("WLTC.csv", "power_kw_10hz", 7.5),  # ~1.5C peak discharge, power shape used as current
}
DRIVE_SOC0 = 0.95
DRIVE_SOC_END = 0.05
DRIVE_TEMPS = (0, 10, 25, 40)
HPPC_TEMPS = (0, 25, 40)
SOP_TEMPS = (0, 10, 25, 40)
SOP_SOCS = (0.02, 0.05, *(round(0.1 * k, 1) for k in range(1, 10)), 0.95, 0.98)
"""0.1-0.9, and near empty and full, where a state of power binds in service."""
SOP_DURATIONS = (2, 10, 30)
SOP_CAP_A = 150.0  # 30C: above the estimator's own 20C cap, so its limit is never hidden
SOP_REL_TOL = 0.002
"""The bisection stops when its bracket is this narrow: finer than the 1 % a safety check
against the truth must resolve (a prediction 0.5 % above a 1 % bracket says nothing)."""
POWER_TEMPS = HPPC_TEMPS
POWER_LEVELS = (
    0.99,
    0.965,
    0.925,
    *(round(0.85 - 0.1 * k, 2) for k in range(8)),
    0.075,
    0.035,
    0.015,
)
"""SOC levels of the power test: between the SOP truth's points, never on them, so the truth
is interpolated from the test, not read off it."""
POWER_CURRENTS_A = (0.4, 0.8, 1.5, 2.5, 4.0, 6.5, 10.0, 16.0, 25.0, 40.0, 60.0, 90.0, 135.0)
"""The pulse currents at every level, each way (0.08C to 27C, about 1.6x apart)."""
POWER_PULSE_S = 32
"""A little over the longest state-of-power duration (30 s), so the voltage under load is
logged at 30 s."""
POWER_REST_AFTER_PULSE_S = 300
POWER_RESTORE_A = 1.0
POWER_REST_BEFORE_PULSE_S = 1800
POWER_RESTORE_SOC_TOLERANCE = 2e-4
"""The charge put back stops this short of the level: 4 A s, within what a cycler's count
would leave, and it keeps a restore from running after a pulse that did not."""


# --------------------------------------------------------------------------------------------
# PyBaMM helpers (imported lazily so `--help` works without pybamm)
# --------------------------------------------------------------------------------------------


def _pybamm():
    import warnings

    warnings.filterwarnings("ignore")
    import pybamm

    pybamm.set_logging_level("ERROR")
    return pybamm


_ESOH_CACHE: dict | None = None


def esoh() -> dict:
    """Stoichiometries at the voltage limits and the capacity between them (ElectrodeSOHSolver)."""
    global _ESOH_CACHE
    if _ESOH_CACHE is None:
        pybamm = _pybamm()
        pv = pybamm.ParameterValues(PARAMETER_SET)
        assert pv["Lower voltage cut-off [V]"] == V_MIN and pv["Upper voltage cut-off [V]"] == V_MAX
        param = pybamm.LithiumIonParameters()
        solver = pybamm.lithium_ion.ElectrodeSOHSolver(pv, param=param)
        inputs = {
            "Q_n": float(pv.evaluate(param.n.Q_init)),
            "Q_p": float(pv.evaluate(param.p.Q_init)),
            "Q_Li": float(pv.evaluate(param.Q_Li_particles_init)),
        }
        s = solver.solve(inputs)
        _ESOH_CACHE = {
            "x_0": float(s["x_0"]),
            "x_100": float(s["x_100"]),
            "y_0": float(s["y_0"]),
            "y_100": float(s["y_100"]),
            "capacity_ah": float(s["Q"]),
            "Q_n_ah": inputs["Q_n"],
            "Q_p_ah": inputs["Q_p"],
            "Q_Li_ah": inputs["Q_Li"],
            "ocv_at_soc0_v": float(s["Up(y_0) - Un(x_0)"]),
            "ocv_at_soc1_v": float(s["Up(y_100) - Un(x_100)"]),
            "max_theoretical_energy_wh": float(s["Maximum theoretical energy [W.h]"]),
            "temperature_c": 25.0,
            "note": "Chen2020 OCPs have zero entropic change: these do not depend on temperature",
        }
    return _ESOH_CACHE


def soc_from_x(x_avg):
    e = esoh()
    return (np.asarray(x_avg) - e["x_0"]) / (e["x_100"] - e["x_0"])


def parameter_values(temp_c: float, soc0: float):
    """Chen2020 with ambient/initial temperature and uniform (rested) concentrations at soc0."""
    pybamm = _pybamm()
    e = esoh()
    pv = pybamm.ParameterValues(PARAMETER_SET)
    x = e["x_0"] + soc0 * (e["x_100"] - e["x_0"])
    y = e["y_0"] - soc0 * (e["y_0"] - e["y_100"])
    pv.update(
        {
            "Ambient temperature [K]": 273.15 + temp_c,
            "Initial temperature [K]": 273.15 + temp_c,
            "Initial concentration in negative electrode [mol.m-3]": x
            * pv["Maximum concentration in negative electrode [mol.m-3]"],
            "Initial concentration in positive electrode [mol.m-3]": y
            * pv["Maximum concentration in positive electrode [mol.m-3]"],
        }
    )
    return pv


VOLTAGE_EVENTS = (
    "Maximum voltage [V]",
    "Maximum voltage switch [V]",
    "Minimum voltage [V]",
    "Minimum voltage switch [V]",
)
"""The model's own cut-off events, dropped where the steps' terminations stop at the limits."""


def make_model(kind: str, drop_events=("Maximum voltage [V]", "Maximum voltage switch [V]")):
    pybamm = _pybamm()
    cls = {"DFN": pybamm.lithium_ion.DFN, "SPMe": pybamm.lithium_ion.SPMe}[kind]
    model = cls({"thermal": "lumped"})
    model.events = [ev for ev in model.events if ev.name not in drop_events]
    return model


OUT_VARS = [
    "Time [s]",
    "Current [A]",
    "Voltage [V]",
    "Volume-averaged cell temperature [C]",
    "Average negative particle stoichiometry",
    "Average positive particle stoichiometry",
]


def _frame(sol) -> dict:
    """Solution -> arrays in pybms conventions (the one place the current sign is flipped)."""
    t = np.asarray(sol["Time [s]"].entries, dtype=float)
    cols = {
        "time_s": t,
        "current_a": -np.asarray(sol["Current [A]"].entries, dtype=float),  # PyBaMM + = discharge
        "voltage_v": np.asarray(sol["Voltage [V]"].entries, dtype=float),
        "temp_c": np.asarray(sol["Volume-averaged cell temperature [C]"].entries, dtype=float),
        "soc_true": soc_from_x(sol["Average negative particle stoichiometry"].entries),
    }
    e = esoh()
    soc_p = (e["y_0"] - np.asarray(sol["Average positive particle stoichiometry"].entries)) / (
        e["y_0"] - e["y_100"]
    )
    cols["_soc_pos_minus_neg_max"] = float(np.max(np.abs(soc_p - cols["soc_true"])))
    return cols


FMT = {
    "time_s": "%.1f",
    "current_a": "%.4f",
    "voltage_v": "%.5f",
    "temp_c": "%.2f",
    "soc_true": "%.6f",
}


def _dedupe_rounded(cols: dict, idx: np.ndarray, time_decimals: int = 1) -> np.ndarray:
    """Keep idx sorted; among rows whose time rounds to the same 0.1 s (or other
    ``time_decimals``) keep the LAST one."""
    idx = np.unique(idx)
    tr = np.round(cols["time_s"][idx], time_decimals)
    keep = np.ones(len(idx), dtype=bool)
    keep[:-1] = tr[1:] != tr[:-1]
    return idx[keep]


def write_csv(path: Path, cols: dict, idx: np.ndarray, time_decimals: int = 1) -> dict:
    idx = _dedupe_rounded(cols, idx, time_decimals)
    names = HEADER.split(",")
    formats = dict(FMT, time_s=f"%.{time_decimals}f")
    arr = np.column_stack([cols[n][idx] for n in names])
    # avoid "-0.0000"
    with open(path, "w") as f:
        f.write(HEADER + "\n")
        for row in arr:
            f.write(
                ",".join((formats[n] % v) for n, v in zip(names, row, strict=False)).replace(
                    "-0.0000,", "0.0000,"
                )
                + "\n"
            )
    return {"rows": len(idx)}


def first_per_period(time_s: np.ndarray, period_s: float) -> np.ndarray:
    """Mask of the first sample in every ``period_s`` of time (the sparse part of a log)."""
    bins = np.floor(time_s / period_s + 1e-9)
    return np.concatenate([[True], bins[1:] != bins[:-1]])


def _coulomb_check(cols: dict) -> float:
    """max |soc_true - (soc_true[0] + trapz(current)/Q)| over the full-resolution solution."""
    t, i = cols["time_s"], cols["current_a"]
    q = np.concatenate([[0.0], np.cumsum(0.5 * (i[1:] + i[:-1]) * np.diff(t))]) / 3600.0
    cc = cols["soc_true"][0] + q / esoh()["capacity_ah"]
    return float(np.max(np.abs(cc - cols["soc_true"])))


def _step_change_times(sol) -> list[float]:
    return [float(s.t[0]) for s in sol.sub_solutions[1:]]


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


def job_ocv(out: Path, model_kind: str) -> dict:
    pybamm = _pybamm()
    temp_c = 25.0
    pv = parameter_values(temp_c, 1.0)
    model = make_model(model_kind, drop_events=VOLTAGE_EVENTS)
    steps = [
        "Discharge at C/20 until 2.5 V",
        "Rest for 1 hour",
        "Charge at C/20 until 4.2 V",
        "Hold at 4.2 V until C/50",
        "Rest for 1 hour",
    ]
    exp = pybamm.Experiment([pybamm.step.string(s, period="10 seconds") for s in steps])
    sim = pybamm.Simulation(model, parameter_values=pv, experiment=exp)
    sol = sim.solve()
    cols = _frame(sol)
    t = cols["time_s"]
    changes = _step_change_times(sol)
    near = np.zeros(len(t), dtype=bool)
    for tc in changes:
        near |= (t >= tc - 300.0 - 1e-6) & (t <= tc + 300.0 + 1e-6)
    idx = np.flatnonzero(near | first_per_period(t, 60.0))
    idx = np.concatenate([idx, [0, len(t) - 1]])
    info = write_csv(out / "ocv_25C.csv", cols, idx)
    subs = sol.sub_solutions
    cap_dis = float(
        np.trapezoid(
            -cols["current_a"][(t >= subs[0].t[0]) & (t <= subs[0].t[-1])],
            t[(t >= subs[0].t[0]) & (t <= subs[0].t[-1])],
        )
        / 3600.0
    )
    m = (t >= subs[2].t[0]) & (t <= subs[3].t[-1])
    cap_chg = float(np.trapezoid(cols["current_a"][m], t[m]) / 3600.0)
    info.update(
        {
            "test": "OCV (C/20 based on 5.0 Ah nominal = 0.25 A)",
            "temp_c": temp_c,
            "soc0": 1.0,
            "steps": steps,
            "sampling": "10 s within 300 s of a step change, else first sample per 60 s",
            "step_terminations": [s.termination for s in subs],
            "step_change_times_s": changes,
            "c20_discharge_capacity_ah": cap_dis,
            "c20_charge_plus_cv_capacity_ah": cap_chg,
            "soc_true_min": float(cols["soc_true"].min()),
            "soc_true_max": float(cols["soc_true"].max()),
            "coulomb_vs_soc_true_max_abs": _coulomb_check(cols),
            "soc_pos_vs_neg_max_abs": cols["_soc_pos_minus_neg_max"],
        }
    )
    return info


def job_hppc(out: Path, model_kind: str, temp_c: float) -> dict:
    pybamm = _pybamm()
    pv = parameter_values(temp_c, 1.0)
    model = make_model(model_kind, drop_events=VOLTAGE_EVENTS)
    e = esoh()
    levels = [round(1.0 - 0.1 * k, 1) for k in range(10)] + [0.05]
    i_dis, i_chg, i_half = 5.0, 3.75, 2.5

    def soc_term(target):
        x_t = e["x_0"] + target * (e["x_100"] - e["x_0"])
        return pybamm.step.CustomTermination(
            f"soc_true <= {target:.2f}",
            lambda v, x_t=x_t: v["Average negative particle stoichiometry"] - x_t,
        )

    steps = [pybamm.step.rest(duration=10, period=1)]
    plan = [("initial rest 10 s", 0.0)]  # (label, PyBaMM current) per planned step
    for k, lev in enumerate(levels):
        steps += [
            pybamm.step.current(i_dis, duration=30, termination=f"{V_MIN} V", period=1),
            pybamm.step.rest(duration=600, period=1),
            pybamm.step.current(
                -i_chg, duration=30, termination=f"{HPPC_CHARGE_PULSE_V_MAX} V", period=1
            ),
            pybamm.step.rest(duration=600, period=1),
        ]
        plan += [
            (f"soc {lev}: 1C discharge pulse", i_dis),
            (f"soc {lev}: rest", 0.0),
            (f"soc {lev}: 0.75C charge pulse", -i_chg),
            (f"soc {lev}: rest", 0.0),
        ]
        if k + 1 < len(levels):
            nxt = levels[k + 1]
            steps += [
                pybamm.step.current(i_half, termination=[f"{V_MIN} V", soc_term(nxt)], period=1),
                pybamm.step.rest(duration=3600, period=1),
            ]
            plan += [(f"C/2 discharge to soc {nxt}", i_half), ("rest 1 h", 0.0)]
    exp = pybamm.Experiment(steps)
    sim = pybamm.Simulation(model, parameter_values=pv, experiment=exp)
    sol = sim.solve()
    subs = sol.sub_solutions
    cols = _frame(sol)
    t = cols["time_s"]
    # align sub-solutions with the plan: steps infeasible at their start (e.g. a charge pulse that
    # would exceed the cut-off immediately) produce no sub-solution; never two rests in a row.
    step_log, j = [], 0
    for s in subs:
        i0 = float(np.median(s["Current [A]"].entries))
        while j < len(plan) and abs(plan[j][1] - i0) > 1e-6:
            step_log.append(
                {
                    "step": plan[j][0],
                    "skipped": True,
                    "reason": "infeasible at step start (cut-off exceeded at once)",
                }
            )
            j += 1
        if j >= len(plan):
            raise RuntimeError("could not align HPPC sub-solutions with the plan")
        sm = (t >= s.t[0]) & (t <= s.t[-1])
        step_log.append(
            {
                "step": plan[j][0],
                "t_start_s": float(s.t[0]),
                "t_end_s": float(s.t[-1]),
                "duration_s": float(s.t[-1] - s.t[0]),
                "termination": s.termination,
                "soc_true_start": float(cols["soc_true"][sm][0]),
                "soc_true_end": float(cols["soc_true"][sm][-1]),
                "v_min": float(cols["voltage_v"][sm].min()),
                "v_max": float(cols["voltage_v"][sm].max()),
            }
        )
        j += 1
    step_log += [
        {"step": lab, "skipped": True, "reason": "experiment ended"} for lab, _ in plan[j:]
    ]
    changes = [
        float(b.t[0])
        for a, b in itertools.pairwise(subs)
        if abs(float(a["Current [A]"].entries[-1]) - float(b["Current [A]"].entries[0])) > 1e-6
    ]
    win = np.zeros(len(t), dtype=bool)
    for tc in changes:
        win |= (t >= tc - 2.0 - 1e-6) & (t <= tc + 120.0 + 1e-6)
    idx = np.concatenate([np.flatnonzero(win | first_per_period(t, 30.0)), [0, len(t) - 1]])
    name = f"hppc_{int(temp_c)}C.csv"
    info = write_csv(out / name, cols, idx)
    truncated = [
        s
        for s in step_log
        if "pulse" in s["step"] and (s.get("skipped") or s["duration_s"] < 29.999)
    ]
    level_info = []  # first executed step of each SOC level (normally its discharge pulse)
    for lev in levels:
        done = [s for s in step_log if s["step"].startswith(f"soc {lev}:") and not s.get("skipped")]
        if done:
            level_info.append(
                {
                    "soc_nominal": lev,
                    "soc_true": done[0]["soc_true_start"],
                    "t_pulse_s": done[0]["t_start_s"],
                    "first_step": done[0]["step"],
                }
            )
    info.update(
        {
            "test": "HPPC",
            "temp_c": temp_c,
            "soc0": 1.0,
            "pulses": {
                "discharge_a": i_dis,
                "charge_a": i_chg,
                "duration_s": 30,
                "rest_s": 600,
                "discharge_pulse_until_v": V_MIN,
                "charge_pulse_until_v": HPPC_CHARGE_PULSE_V_MAX,
            },
            "soc_step": f"C/2 ({i_half} A) until soc_true reaches the next level or {V_MIN} V, "
            "rest 3600 s",
            "sampling": "1 s from 2 s before to 120 s after each step change, "
            "else first sample per 30 s",
            "levels": level_info,
            "steps": step_log,
            "truncated_pulses": truncated,
            "coulomb_vs_soc_true_max_abs": _coulomb_check(cols),
            "soc_pos_vs_neg_max_abs": cols["_soc_pos_minus_neg_max"],
            "v_max": float(cols["voltage_v"].max()),
            "v_min": float(cols["voltage_v"].min()),
        }
    )
    return info


def load_drive_cycle(cycle: str) -> tuple[np.ndarray, dict]:
    """Return the 1 Hz current profile (PyBaMM sign: + = discharge) for one period, and notes."""
    fname, kind, peak = DRIVE_CYCLES[cycle]
    path = DRIVE_DIR / fname
    raw = np.loadtxt(path, delimiter=",", comments="#")
    t, v = raw[:, 0], raw[:, 1]
    if kind == "current":
        assert np.allclose(np.diff(t), 1.0)
        shape = v
        how = "1 Hz current [A] from the file, scaled"
    else:  # 10 Hz power in kW: block-mean each 1 s window [k, k+1) -> value at t = k s
        n = math.floor(len(v) / 10)
        shape = v[: n * 10].reshape(n, 10).mean(axis=1)
        how = (
            "10 Hz power [kW] from the file block-averaged over each 1 s window [k, k+1) "
            "(last lone sample dropped), used as a current shape, scaled"
        )
    scale = peak / float(shape.max())
    prof = shape * scale
    notes = {
        "source_file": f"drive_cycles/{fname}",
        "source_sha256": sha256(path),
        "how": how,
        "scale_factor": scale,
        "scale_units": "A per A" if kind == "current" else "A per kW",
        "peak_discharge_a": float(prof.max()),
        "peak_charge_a": float(-prof.min()),
        "mean_discharge_a": float(prof.mean()),
        "period_s": len(prof),
    }
    return prof, notes


def job_drive(out: Path, model_kind: str, cycle: str, temp_c: float) -> dict:
    pybamm = _pybamm()
    prof, notes = load_drive_cycle(cycle)
    e = esoh()
    n_rep = (
        math.ceil(
            (DRIVE_SOC0 - DRIVE_SOC_END)
            * e["capacity_ah"]
            * 3600.0
            / (prof.mean() * len(prof))
            * 1.3
        )
        + 2
    )
    cur = np.tile(prof, n_rep)
    t = np.arange(len(cur), dtype=float)
    pv = parameter_values(temp_c, DRIVE_SOC0)
    pv.update({"Current function [A]": pybamm.Interpolant(t, cur, pybamm.t, interpolator="linear")})
    model = make_model(model_kind)  # keeps the 2.5 V minimum-voltage termination event
    x_end = e["x_0"] + DRIVE_SOC_END * (e["x_100"] - e["x_0"])
    model.events.append(
        pybamm.Event(
            f"soc_true < {DRIVE_SOC_END}",
            model.variables["Average negative particle stoichiometry"] - x_end,
        )
    )
    sim = pybamm.Simulation(model, parameter_values=pv)
    sol = sim.solve([0.0, float(t[-1])], t_interp=t)
    if sol.termination == "final time":
        raise RuntimeError(f"{cycle} {temp_c}: ran out of profile ({n_rep} repeats)")
    cols = _frame(sol)
    name = f"{cycle}_{int(temp_c)}C.csv"
    info = write_csv(out / name, cols, np.arange(len(cols["time_s"])))
    notes.update(
        {
            "test": "drive cycle",
            "cycle": cycle,
            "temp_c": temp_c,
            "soc0": DRIVE_SOC0,
            "stop": f"voltage < {V_MIN} V or soc_true < {DRIVE_SOC_END}",
            "termination": sol.termination,
            "end_time_s": float(cols["time_s"][-1]),
            "repeats_completed": float(cols["time_s"][-1] / len(prof)),
            "interpolation": "current linear between 1 Hz points "
            "(trapezoid integration of the log is exact)",
            "soc_true_end": float(cols["soc_true"][-1]),
            "v_min": float(cols["voltage_v"].min()),
            "v_max": float(cols["voltage_v"].max()),
            "temp_c_max": float(cols["temp_c"].max()),
            "coulomb_vs_soc_true_max_abs": _coulomb_check(cols),
            "soc_pos_vs_neg_max_abs": cols["_soc_pos_minus_neg_max"],
            "sampling": "1 Hz (plus the termination instant as the last row)",
        }
    )
    info.update(notes)
    return info


def job_sop(out: Path, model_kind: str, temp_c: float) -> dict:
    """Max constant discharge/charge current from rest keeping 2.5 V <= V <= 4.2 V for d seconds."""
    pybamm = _pybamm()
    e = esoh()
    pv = parameter_values(temp_c, 0.5)
    pv.update(
        {
            "Current function [A]": "[input]",
            "Initial concentration in negative electrode [mol.m-3]": "[input]",
            "Initial concentration in positive electrode [mol.m-3]": "[input]",
        }
    )
    cn_max = pv["Maximum concentration in negative electrode [mol.m-3]"]
    cp_max = pv["Maximum concentration in positive electrode [mol.m-3]"]
    model = make_model(model_kind, drop_events=())  # both voltage limits terminate
    solver = pybamm.IDAKLUSolver(rtol=1e-6, atol=1e-8)
    sim = pybamm.Simulation(model, parameter_values=pv, solver=solver)
    n_solves, n_fail = 0, 0
    fail_examples = []

    def feasible(soc, current_pb, dur):
        nonlocal n_solves, n_fail
        inputs = {
            "Current function [A]": current_pb,
            "Initial concentration in negative electrode [mol.m-3]": (
                e["x_0"] + soc * (e["x_100"] - e["x_0"])
            )
            * cn_max,
            "Initial concentration in positive electrode [mol.m-3]": (
                e["y_0"] - soc * (e["y_0"] - e["y_100"])
            )
            * cp_max,
        }
        n_solves += 1
        try:
            sol = sim.solve([0.0, float(dur)], inputs=inputs)
        except Exception as exc:  # solver breakdown at extreme current = limit exceeded
            n_fail += 1
            if len(fail_examples) < 5:
                fail_examples.append(f"soc={soc} I={current_pb:.3f} d={dur}: {type(exc).__name__}")
            return False
        if sol.termination != "final time":
            return False
        v = sol["Voltage [V]"].entries
        return bool(v.min() >= V_MIN - 1e-9 and v.max() <= V_MAX + 1e-9)

    def search(soc, dur, sign, hi_hint):
        """Largest |I| in (0, cap] feasible; sign=+1 discharge (PyBaMM +), -1 charge."""
        hi = min(SOP_CAP_A, hi_hint)
        if feasible(soc, sign * hi, dur):
            if hi >= SOP_CAP_A:
                return SOP_CAP_A, True
            lo = hi
            hi = SOP_CAP_A
            if feasible(soc, sign * hi, dur):
                return SOP_CAP_A, True
        else:
            lo = 0.0
            probe = hi / 4.0
            while probe > 0.05:
                if feasible(soc, sign * probe, dur):
                    lo = probe
                    break
                hi = probe
                probe /= 4.0
            if lo == 0.0:
                return 0.0, False
        while hi > lo * (1.0 + SOP_REL_TOL):
            mid = math.sqrt(lo * hi)
            if feasible(soc, sign * mid, dur):
                lo = mid
            else:
                hi = mid
        return lo, False

    rows, capped = [], []
    for soc in SOP_SOCS:
        hint_d, hint_c = SOP_CAP_A, SOP_CAP_A
        for dur in (
            SOP_DURATIONS
        ):  # increasing duration -> limits decrease: previous result is an upper bound
            i_d, cap_d = search(soc, dur, +1.0, hint_d * 1.02)
            i_c, cap_c = search(soc, dur, -1.0, hint_c * 1.02)
            hint_d, hint_c = max(i_d, 0.1), max(i_c, 0.1)
            rows.append((temp_c, soc, dur, i_d, i_c))
            if cap_d:
                capped.append({"soc": soc, "duration_s": dur, "direction": "discharge"})
            if cap_c:
                capped.append({"soc": soc, "duration_s": dur, "direction": "charge"})
    part = out / f".sop_part_{int(temp_c)}C.csv"
    with open(part, "w") as f:
        for r in rows:
            f.write(f"{r[0]:.0f},{r[1]:.2f},{r[2]:d},{r[3]:.3f},{r[4]:.3f}\n")
    return {
        "test": "SOP",
        "temp_c": temp_c,
        "n_solves": n_solves,
        "n_solver_failures": n_fail,
        "solver_failure_examples": fail_examples,
        "capped": capped,
        "part_file": part.name,
    }


def job_power(out: Path, model_kind: str, temp_c: float) -> dict:
    """Power test: at each level, pulses from a long rest at every current of a ladder.

    Starts rested at soc 1. At each POWER_LEVELS level, for each current (ascending) and each
    direction: a pulse of POWER_PULSE_S or until the cut-off (2.5 V discharge, 4.2 V charge),
    a rest, the charge put back at POWER_RESTORE_A until soc_true is at the level again, and
    POWER_REST_BEFORE_PULSE_S of rest, so every pulse starts from a rested cell at the level
    (as the SOP truth does). Then C/2 to the next level and an hour's rest.
    """
    pybamm = _pybamm()
    pv = parameter_values(temp_c, 1.0)
    model = make_model(model_kind, drop_events=VOLTAGE_EVENTS)
    e = esoh()

    def soc_reached(target, falling, tolerance=0.0):
        """Ends a step at ``target`` (less ``tolerance`` on the way there, so that a step
        that starts there already, after a pulse that did not run, is not run either)."""
        target = target + tolerance if falling else target - tolerance
        x_t = e["x_0"] + target * (e["x_100"] - e["x_0"])
        sign = 1.0 if falling else -1.0
        return pybamm.step.CustomTermination(
            f"soc_true {'<=' if falling else '>='} {target:.3f}",
            lambda v, x_t=x_t, sign=sign: (
                sign * (v["Average negative particle stoichiometry"] - x_t)
            ),
        )

    steps = [pybamm.step.rest(duration=60, period=10)]
    for level in POWER_LEVELS:
        steps += [
            pybamm.step.current(
                2.5, termination=[f"{V_MIN} V", soc_reached(level, True)], period=30
            ),
            pybamm.step.rest(duration=3600, period=60),
        ]
        for current in POWER_CURRENTS_A:
            for pb_sign in (1.0, -1.0):  # PyBaMM: + discharge, - charge
                cut_v, back_v = (V_MIN, V_MAX) if pb_sign > 0 else (V_MAX, V_MIN)
                back_at_level = soc_reached(level, pb_sign < 0, POWER_RESTORE_SOC_TOLERANCE)
                steps += [
                    pybamm.step.current(
                        pb_sign * current,
                        duration=POWER_PULSE_S,
                        termination=f"{cut_v} V",
                        period=1,
                    ),
                    pybamm.step.rest(duration=POWER_REST_AFTER_PULSE_S, period=30),
                    # the charge put back: constant current, then constant voltage at the
                    # limit if it gets there first (near full or empty)
                    pybamm.step.current(
                        -pb_sign * POWER_RESTORE_A,
                        termination=[f"{back_v} V", back_at_level],
                        period=30,
                    ),
                    pybamm.step.voltage(
                        back_v, termination=back_at_level, duration=4 * 3600, period=30
                    ),
                    pybamm.step.rest(duration=POWER_REST_BEFORE_PULSE_S, period=60),
                ]
    sim = pybamm.Simulation(model, parameter_values=pv, experiment=pybamm.Experiment(steps))
    sol = sim.solve()
    cols = _frame(sol)
    t = cols["time_s"]
    # Every step's first and last point is logged, the last 0.01 s before the change (the
    # solution holds both at the same instant), so that the trapezoid over the log counts
    # the charge of each step exactly, however sparse the samples between changes; times
    # to 0.01 s, so that a pulse cut within a fraction of a second is not lost.
    lengths = np.array([len(s.t) for s in sol.sub_solutions])
    if lengths.sum() != t.size:
        raise RuntimeError("sub-solutions do not tile the solution")
    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    last = first + lengths - 1
    keep = np.zeros(t.size, dtype=bool)
    keep[first] = keep[last] = True
    crowding = np.zeros(t.size, dtype=bool)
    pulses = 0
    for sub, a, b in zip(sol.sub_solutions, first, last, strict=True):
        amps = float(np.median(sub["Current [A]"].entries))
        if sub.t[-1] - sub.t[0] <= POWER_PULSE_S + 1e-6 and np.any(
            np.isclose(abs(amps), POWER_CURRENTS_A)
        ):
            keep[a : b + 1] = True
            pulses += 1

        if b + 1 < t.size and sub.t[-1] - sub.t[0] >= 0.02:
            t[b] -= 0.01
            crowding[a:b] = t[a:b] > t[b] - 0.006  # would round onto or past it
    keep |= first_per_period(t, 60.0)
    idx = np.flatnonzero(keep & ~crowding)
    info = write_csv(out / f"power_{int(temp_c)}C.csv", cols, idx, time_decimals=2)
    info.update(
        {
            "test": "power (pulses from rest at a ladder of currents)",
            "temp_c": temp_c,
            "soc0": 1.0,
            "levels": list(POWER_LEVELS),
            "currents_a": list(POWER_CURRENTS_A),
            "pulse_s": POWER_PULSE_S,
            "pulse_until_v": {"discharge": V_MIN, "charge": V_MAX},
            "rests_s": {
                "after_pulse": POWER_REST_AFTER_PULSE_S,
                "before_pulse": POWER_REST_BEFORE_PULSE_S,
            },
            "restore_a": POWER_RESTORE_A,
            "pulses_run": pulses,
            "pulses_planned": 2 * len(POWER_LEVELS) * len(POWER_CURRENTS_A),
            "sampling": "every 1 s in a pulse, each step's first point and its last 0.01 s "
            "before the change, else first sample per 60 s; time to 0.01 s",
            "coulomb_vs_soc_true_max_abs": _coulomb_check(cols),
            "v_max": float(cols["voltage_v"].max()),
            "v_min": float(cols["voltage_v"].min()),
        }
    )
    return info


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def all_jobs() -> dict:
    jobs = {
        "ocv_25C": ("ocv", ()),
    }
    for T in HPPC_TEMPS:
        jobs[f"hppc_{T}C"] = ("hppc", (float(T),))
    for cyc in ("us06", "udds", "wltc"):
        for T in DRIVE_TEMPS:
            jobs[f"{cyc}_{T}C"] = ("drive", (cyc, float(T)))
    for T in SOP_TEMPS:
        jobs[f"sop_{T}C"] = ("sop", (float(T),))
    for T in POWER_TEMPS:
        jobs[f"power_{T}C"] = ("power", (float(T),))
    return jobs


# rough relative costs, to start the longest first
COST = {"udds": 10, "power": 8, "us06": 4, "sop": 6, "wltc": 3, "hppc": 2, "ocv": 1}


def run_job(args):
    name, kind, jargs, out, models = args
    np.random.seed(SEED)  # nothing here is random; seeded for form's sake
    fn = {"ocv": job_ocv, "hppc": job_hppc, "drive": job_drive, "sop": job_sop, "power": job_power}[
        kind
    ]
    errors = []
    for mk in models:
        t0 = time.time()
        try:
            info = fn(Path(out), mk, *jargs)
            info.update({"model": mk, "runtime_s": round(time.time() - t0, 1)})
            if errors:
                info["fallback_from"] = errors
            print(f"[done] {name} ({mk}) in {info['runtime_s']} s", flush=True)
            return name, info
        except Exception as exc:
            errors.append(f"{mk}: {type(exc).__name__}: {exc} after {time.time() - t0:.1f} s")
            print(f"[fail] {name} ({mk}): {exc}\n{traceback.format_exc()}", flush=True)
    return name, {"error": errors}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    pybamm = _pybamm()
    import casadi
    import scipy

    v = {
        "python": platform.python_version(),
        "pybamm": pybamm.__version__,
        "numpy": np.__version__,
        "casadi": casadi.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
    }
    try:
        from importlib.metadata import version

        v["pybammsolvers"] = version("pybammsolvers")
    except Exception:
        pass
    return v


def merge_sop(out: Path, manifest: dict) -> None:
    parts = {T: out / f".sop_part_{T}C.csv" for T in SOP_TEMPS}
    if not all(p.exists() for p in parts.values()):
        return
    lines = []
    for T in SOP_TEMPS:
        lines += parts[T].read_text().splitlines()
    with open(out / "sop_truth.csv", "w") as f:
        f.write("temp_c,soc,duration_s,max_discharge_a,max_charge_a\n")
        f.write("\n".join(lines) + "\n")
    manifest["files"]["sop_truth.csv"] = {
        "rows": len(lines),
        "model": sorted(
            {manifest["jobs"].get(f"sop_{T}C", {}).get("model", "?") for T in SOP_TEMPS}
        ),
        "definition": (
            "from rest at (temp_c, soc), constant current for duration_s; largest discharge "
            f"(charge) magnitude keeping V >= {V_MIN} V (V <= {V_MAX} V) for the whole "
            f"duration; geometric bisection to {SOP_REL_TOL:.1%} (value reported is the "
            f"feasible end of the bracket); search capped at {SOP_CAP_A} A (30C): a value "
            f"of exactly {SOP_CAP_A} means the cap was reached; any other termination "
            "event or solver failure counts as infeasible"
        ),
        "capped": {f"{T}C": manifest["jobs"].get(f"sop_{T}C", {}).get("capped") for T in SOP_TEMPS},
    }


def make_fixtures(out: Path, fix: Path) -> None:
    fix.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((out / "manifest.json").read_text())

    def read(name):
        with open(out / name) as f:
            header = f.readline().strip()
            lines = f.read().splitlines()
        assert header == HEADER
        return lines

    def write_window(source, name, start_s, stop_s):
        """The rows of ``source`` with start_s <= time_s < stop_s, as fixture ``name``."""
        rows = [ln for ln in read(source) if start_s <= float(ln.split(",")[0]) < stop_s]
        (fix / name).write_text(HEADER + "\n" + "\n".join(rows) + "\n")

    # 1. first 900 s of us06_25C
    write_window("us06_25C.csv", "us06_25C_first900s.csv", -math.inf, 900.0)
    # 2. ocv_25C every 5 min (first row per 300 s bin) plus the rows where the current changes
    lines = read("ocv_25C.csv")
    t = np.array([float(ln.split(",")[0]) for ln in lines])
    i = np.array([float(ln.split(",")[1]) for ln in lines])
    keep = first_per_period(t, 300.0)
    chg = np.concatenate([[False], np.abs(np.diff(i)) > 0.02])
    keep |= chg | np.concatenate([chg[1:], [False]])  # row before and after each step change
    keep[-1] = True
    (fix / "ocv_25C_5min.csv").write_text(
        HEADER + "\n" + "\n".join(ln for ln, k in zip(lines, keep, strict=False) if k) + "\n"
    )
    # 3. hppc_25C whole: `bms identify` refuses gaps in a test, so no excerpt of it
    lines = read("hppc_25C.csv")
    (fix / "hppc_25C.csv").write_text(HEADER + "\n" + "\n".join(lines) + "\n")
    # 4. power_25C's first three levels (0.99, 0.965, 0.925): up to the C/2 step to the
    # fourth (the step to the first level is shorter than 2 min: not one of these)
    lines = read("power_25C.csv")
    t = np.array([float(ln.split(",")[0]) for ln in lines])
    i = np.array([float(ln.split(",")[1]) for ln in lines])
    starts = np.flatnonzero((i == -2.5) & (np.concatenate([[0.0], i[:-1]]) != -2.5))
    ends = np.flatnonzero((i == -2.5) & (np.concatenate([i[1:], [0.0]]) != -2.5))
    moves = [a for a, b in zip(starts, ends, strict=True) if t[b] - t[a] > 120.0]
    (fix / "power_25C_3levels.csv").write_text(HEADER + "\n" + "\n".join(lines[: moves[2]]) + "\n")
    # 5. wltc_0C from 30 min in, for 25 min: where a start 30 % off is made
    write_window("wltc_0C.csv", "wltc_0C_30to55min.csv", 1800.0, 3300.0)
    meta = {
        "source_manifest_sha256": sha256(out / "manifest.json"),
        "files": {
            p.name: {
                "sha256": sha256(p),
                "bytes": p.stat().st_size,
                "rows": p.read_text().count("\n") - 1,
            }
            for p in sorted(fix.glob("*.csv"))
        },
        "source_sha256": {
            n: manifest["files"][n]["sha256"]
            for n in ("us06_25C.csv", "ocv_25C.csv", "hppc_25C.csv", "power_25C.csv", "wltc_0C.csv")
        },
    }
    (fix / "fixtures.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta["files"], indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/truth"))
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="job names (e.g. ocv_25C hppc_0C us06_25C sop_truth sop_25C); default all",
    )
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--model",
        choices=["DFN", "SPMe"],
        default="DFN",
        help="first model to try; on failure the other is tried (DFN -> SPMe only)",
    )
    ap.add_argument(
        "--fixtures",
        type=Path,
        default=None,
        help="only (re)derive test fixtures from --out into this directory",
    )
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    jobs = all_jobs()
    if a.list:
        print("\n".join([*list(jobs), "sop_truth (= all sop_*)"]))
        return 0
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.fixtures is not None:
        make_fixtures(out, a.fixtures)
        return 0
    names = list(jobs)
    if a.only:
        names = []
        for n in a.only:
            n = n.removesuffix(".csv")
            if n == "sop_truth":
                names += [f"sop_{T}C" for T in SOP_TEMPS]
            elif n in jobs:
                names.append(n)
            else:
                ap.error(f"unknown job {n}; see --list")
    names = sorted(dict.fromkeys(names), key=lambda n: -COST[n.split("_")[0]])
    models = ["DFN", "SPMe"] if a.model == "DFN" else ["SPMe"]
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("files", {})
    manifest.setdefault("jobs", {})
    t0 = time.time()
    esoh()  # fail fast
    work = [(n, jobs[n][0], jobs[n][1], str(out), models) for n in names]
    if a.jobs > 1 and len(work) > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(a.jobs, maxtasksperchild=1) as pool:
            results = list(pool.imap_unordered(run_job, work))
    else:
        results = [run_job(w) for w in work]
    for name, info in results:
        if name.startswith("sop_"):
            manifest["jobs"][name] = info
        else:
            manifest["jobs"][name] = {k: info.get(k) for k in ("model", "runtime_s", "error")}
        if "error" not in info and not name.startswith("sop_"):
            manifest["files"][f"{name}.csv"] = info
    merge_sop(out, manifest)
    for fname, info in manifest["files"].items():
        p = out / fname
        if p.exists():
            info["sha256"] = sha256(p)
            info["bytes"] = p.stat().st_size
    e = esoh()
    manifest.update(
        {
            "generator": "models/ecm/truth/generate.py",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "seed": SEED,
            "versions": versions(),
            "parameter_set": PARAMETER_SET,
            "model_default": a.model + " with {'thermal': 'lumped'} (SPMe fallback on failure)",
            "thermal": "lumped; ambient = initial temperature = test temperature; Chen2020 default "
            "total heat transfer coefficient 10 W/m2/K",
            "electrode_soh": e,
            "soc_true_definition": "(x_avg - x_0)/(x_100 - x_0), "
            "x_avg = 'Average negative particle stoichiometry'; "
            "x_0/x_100 from ElectrodeSOHSolver at 2.5 V / 4.2 V",
            "conventions": {
                "current_a": "positive = charging (PyBaMM current negated once)",
                "columns": HEADER,
                "precision": FMT,
            },
            "last_run_wall_s": round(time.time() - t0, 1),
            "last_run_jobs": names,
        }
    )
    manifest_path.write_text(json.dumps(manifest, indent=1, default=float) + "\n")
    failed = [n for n, i in results if "error" in i]
    print(
        f"wrote {manifest_path}; {len(results) - len(failed)} ok, failed: {failed}; "
        f"{time.time() - t0:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
