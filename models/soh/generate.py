#!/usr/bin/env python3
"""Generate physics ageing data for the state-of-health estimators (PyBaMM, offline).

Run with the training environment (PyBaMM is a build-time tool, never a run-time dependency):

    .venv-train/bin/python models/soh/generate.py --out benchmarks/out/soh --jobs 2
    .venv-train/bin/python models/soh/generate.py --out benchmarks/out/soh --only t00 t01
    .venv-train/bin/python models/soh/generate.py --out benchmarks/out/soh-mini --mini
    .venv-train/bin/python models/soh/generate.py --list

Model: PyBaMM SPM, OKane2022 parameters (LG M50, NMC811 / graphite-SiOx, ~5.1 Ah, 2.5-4.2 V),
isothermal at the condition's ambient temperature, with the coupled degradation submodels:
solvent-diffusion-limited SEI (with SEI on cracks), partially reversible lithium plating,
particle swelling and cracking, stress-driven loss of active material.

Each trajectory cycles one cell under one condition (temperature, charge rate, depth of
discharge, storage SOC) and runs a check-up every CYCLES_PER_BLOCK cycles:

    C/5 discharge to 2.5 V, rest 1 h          -> a rested point near SOC 0
    CC charge at the condition's rate to 4.2 V, CV to C/20 (10 s samples)  -> the charge segment
    rest 1 h                                   -> a rested point near SOC 1
    1C discharge 30 min, rest 1 h, 1C pulse 10 s, rest 10 min (1 s samples) -> pulse response

and records the check-up's samples with the true capacity (ElectrodeSOH of the aged cell at
the end of the check-up, relaxed at mid SOC) and the true pulse resistance.

Ageing is accelerated: SEI solvent diffusivity, the LAM proportional terms and the dead-lithium
decay constant are multiplied by ACCELERATION (times a per-cell lognormal spread, seeded), so a
simulated cycle stands for roughly ACCELERATION cycles of SEI and LAM ageing; the plating
kinetic rate constant is left as it is, so the reversible plating at the top of charge stays
physical. Cycle counts in the output are simulated cycles.

The fresh cell is also characterised with the same model (ageing at natural rates): an OCV test
at 25 degC and HPPC tests at 10, 25, 40 degC, from which `bms identify` fits the parameter set
models/soh/okane2022_spm/ that the estimators run with.

Conventions (pybms): current_a > 0 is CHARGING (PyBaMM's is positive on discharge; negated once,
in `_series`); time_s is seconds from the start of the test or check-up; at a step change the
row kept is the one just after it.

Resumable: each job writes its own file on completion (atomically); a job whose output exists
is skipped unless --force. The manifest records the versions, the seed, every setting and the
sha256 and run time of every output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

SEED = 20261202
PARAMETER_SET = "OKane2022"
MODEL = "SPM"
V_MIN = 2.5
V_MAX = 4.2
NOMINAL_AH = 5.0  # OKane2022's "Nominal cell capacity": used only for C-rates
ACCELERATION = 300.0
CELL_SPREAD_SIGMA = 0.25  # lognormal sigma of the per-cell ageing-rate multiplier
CYCLES_PER_BLOCK = 4
MAX_BLOCKS = 20  # at most 80 simulated cycles
END_CAPACITY_FRACTION = 0.65  # stop once the capacity falls below this share of the fresh cell
STORAGE_REST_H = 6.0
DEGRADATION_OPTIONS = {
    "SEI": "solvent-diffusion limited",
    "SEI porosity change": "false",
    "SEI on cracks": "true",
    "lithium plating": "partially reversible",
    "lithium plating porosity change": "false",
    "particle mechanics": ("swelling and cracking", "swelling only"),
    "loss of active material": "stress-driven",
}
ACCELERATED = (
    "SEI solvent diffusivity [m2.s-1]",
    "Negative electrode LAM constant proportional term [s-1]",
    "Positive electrode LAM constant proportional term [s-1]",
    "Dead lithium decay constant [s-1]",
)

# Conditions: (temp_c, charge_c_rate, depth_of_discharge, storage_soc).
TRAIN_GRID = {
    "temp_c": (10.0, 25.0, 40.0),
    "charge_c_rate": (0.5, 1.0, 1.5),
    "depth_of_discharge": (0.5, 1.0),
    "storage_soc": (0.3, 0.9),
}
TRAIN_COUNT = 20  # drawn (seeded) from the 36 grid points
HELD_OUT = (
    # values the training grid never has: interpolation in every factor ...
    (18.0, 0.75, 0.8, 0.6),
    (33.0, 1.25, 0.8, 0.6),
    (18.0, 1.25, 0.7, 0.3),
    (33.0, 0.75, 0.7, 0.9),
    # ... and extrapolation beyond the temperatures trained on
    (5.0, 1.0, 1.0, 0.6),
    (45.0, 0.5, 0.6, 0.9),
)
MINI = ((25.0, 1.0, 1.0, 0.9), (33.0, 1.25, 0.8, 0.6))
HPPC_TEMPS = (10.0, 25.0, 40.0)


def _pybamm():
    import warnings

    warnings.filterwarnings("ignore")
    import pybamm

    pybamm.set_logging_level("ERROR")
    return pybamm


def conditions(mini: bool = False) -> dict[str, dict]:
    """Job name -> its condition, split and ageing-rate multiplier (all seeded)."""
    rng = np.random.default_rng(SEED)
    if mini:
        chosen = [(c, "train" if k == 0 else "test") for k, c in enumerate(MINI)]
    else:
        grid = [
            (t, c, d, s)
            for t in TRAIN_GRID["temp_c"]
            for c in TRAIN_GRID["charge_c_rate"]
            for d in TRAIN_GRID["depth_of_discharge"]
            for s in TRAIN_GRID["storage_soc"]
        ]
        picked = sorted(rng.choice(len(grid), size=TRAIN_COUNT, replace=False))
        chosen = [(grid[k], "train") for k in picked] + [(c, "test") for c in HELD_OUT]
    spread = np.exp(rng.normal(0.0, CELL_SPREAD_SIGMA, size=len(chosen)))
    out = {}
    for k, ((temp_c, rate, dod, storage), split) in enumerate(chosen):
        out[f"t{k:02d}"] = {
            "temp_c": temp_c,
            "charge_c_rate": rate,
            "depth_of_discharge": dod,
            "storage_soc": storage,
            "split": split,
            "ageing_multiplier": float(ACCELERATION * spread[k]),
        }
    return out


def parameter_values(temp_c: float, ageing_multiplier: float):
    pybamm = _pybamm()
    pv = pybamm.ParameterValues(PARAMETER_SET)
    pv.update(
        {"Ambient temperature [K]": 273.15 + temp_c, "Initial temperature [K]": 273.15 + temp_c}
    )
    for name in ACCELERATED:
        pv[name] = pv[name] * ageing_multiplier
    return pv


def make_model():
    pybamm = _pybamm()
    model = pybamm.lithium_ion.SPM(DEGRADATION_OPTIONS)
    # explicit `until` conditions end the steps; the default maximum-voltage event would abort
    # the charge pulses of the HPPC test near full charge
    model.events = [e for e in model.events if e.name not in ("Maximum voltage [V]",)]
    return model


def _series(sol) -> dict[str, np.ndarray]:
    """A (sub)solution as pybms arrays; the one place the current sign is flipped. Rows at the
    same instant (a step change) keep the last one, so time rises strictly."""
    t = np.asarray(sol["Time [s]"].entries, dtype=float)
    cols = {
        "time_s": t,
        "current_a": -np.asarray(sol["Current [A]"].entries, dtype=float),
        "voltage_v": np.asarray(sol["Voltage [V]"].entries, dtype=float),
        "temp_c": np.asarray(sol["Volume-averaged cell temperature [C]"].entries, dtype=float),
    }
    rounded = np.round(t, 3)
    keep = np.ones(t.size, dtype=bool)
    keep[:-1] = rounded[1:] != rounded[:-1]
    return {name: values[keep] for name, values in cols.items()}


def checkup_steps(charge_c_rate: float):
    pybamm = _pybamm()
    s = pybamm.step.string
    return (
        s(f"Discharge at C/5 until {V_MIN} V", period=30),
        s("Rest for 1 hour", period=10),
        s(f"Charge at {charge_c_rate}C until {V_MAX} V", period=10),
        s(f"Hold at {V_MAX} V until C/20", period=10),
        s("Rest for 1 hour", period=10),
        s("Discharge at 1C for 30 minutes", period=10),
        s("Rest for 1 hour", period=10),
        s("Discharge at 1C for 10 seconds", period=1),
        s("Rest for 10 minutes", period=1),
    )


CHECKUP_PULSE_STEP = 7  # index of the 1C pulse in checkup_steps


def storage_steps(storage_soc: float):
    """From the check-up's end (about SOC 0.48) to the storage SOC at C/2, then the rest."""
    minutes = abs(storage_soc - 0.48) * 120.0
    direction, limit_v = ("Charge", V_MAX) if storage_soc > 0.48 else ("Discharge", V_MIN)
    return (
        f"{direction} at C/2 for {minutes:.1f} minutes or until {limit_v} V",
        f"Rest for {STORAGE_REST_H} hours",
    )


def ageing_steps(charge_c_rate: float, depth_of_discharge: float):
    return (
        f"Charge at {charge_c_rate}C until {V_MAX} V",
        f"Hold at {V_MAX} V until C/20",
        "Rest for 10 minutes",
        f"Discharge at 1C for {60.0 * depth_of_discharge:.1f} minutes or until {V_MIN} V",
        "Rest for 10 minutes",
    )


def job_trajectory(out: Path, name: str, cond: dict, max_blocks: int) -> dict:
    pybamm = _pybamm()
    pv = parameter_values(cond["temp_c"], cond["ageing_multiplier"])
    check = checkup_steps(cond["charge_c_rate"])
    block = [check, storage_steps(cond["storage_soc"])] + [
        ageing_steps(cond["charge_c_rate"], cond["depth_of_discharge"])
    ] * CYCLES_PER_BLOCK
    cycles = block * max_blocks + [check]
    per_block = len(block)
    checkup_cycles = [1 + per_block * b for b in range(max_blocks + 1)]  # 1-based
    experiment = pybamm.Experiment(
        cycles, termination=f"{END_CAPACITY_FRACTION * 100:.0f}% capacity"
    )
    sim = pybamm.Simulation(make_model(), parameter_values=pv, experiment=experiment)
    sol = sim.solve(calc_esoh=True, save_at_cycles=checkup_cycles, initial_soc=1.0)
    summary = sol.summary_variables
    capacity = np.asarray(summary["Capacity [A.h]"], dtype=float)
    arrays: dict[str, np.ndarray] = {}
    records = []
    for k, number in enumerate(checkup_cycles):
        index = number - 1
        if index >= len(sol.cycles) or sol.cycles[index] is None:
            break
        cycle = sol.cycles[index]
        if len(cycle.steps) < len(check):
            break  # a check-up cut short by the termination is no check-up
        series = _series(cycle)
        t0 = series["time_s"][0]
        series["time_s"] = series["time_s"] - t0
        pulse = cycle.steps[CHECKUP_PULSE_STEP]
        before = cycle.steps[CHECKUP_PULSE_STEP - 1]
        v_rest = float(before["Voltage [V]"].entries[-1])
        pulse_t = np.asarray(pulse["Time [s]"].entries) - pulse["Time [s]"].entries[0]
        pulse_v = np.asarray(pulse["Voltage [V]"].entries)
        pulse_i = float(np.median(pulse["Current [A]"].entries))  # PyBaMM sign: + discharge
        v_1s = float(np.interp(1.0, pulse_t, pulse_v))
        v_10s = float(pulse_v[-1])
        for column, values in series.items():
            arrays[f"c{k:02d}_{column}"] = values
        charge_step = cycle.steps[2]
        cv_step = cycle.steps[3]
        charged_ah = (
            float(
                np.trapezoid(-charge_step["Current [A]"].entries, charge_step["Time [s]"].entries)
                + np.trapezoid(-cv_step["Current [A]"].entries, cv_step["Time [s]"].entries)
            )
            / 3600.0
        )
        discharge = cycle.steps[0]
        records.append(
            {
                "checkup": k,
                "simulated_cycles": k * CYCLES_PER_BLOCK,
                "start_time_s": float(t0),
                "throughput_ah": float(summary["Throughput capacity [A.h]"][index]),
                "capacity_ah": float(capacity[index]),
                "capacity_ah_before": float(capacity[index - 1]) if index > 0 else None,
                "c5_discharge_ah": float(
                    np.trapezoid(discharge["Current [A]"].entries, discharge["Time [s]"].entries)
                )
                / 3600.0,
                "cccv_charge_ah": charged_ah,
                "resistance_1s_ohm": (v_rest - v_1s) / pulse_i,
                "resistance_10s_ohm": (v_rest - v_10s) / pulse_i,
                "lli_percent": float(summary["Loss of lithium inventory [%]"][index]),
                "lam_ne_percent": float(
                    summary["Loss of active material in negative electrode [%]"][index]
                ),
                "lam_pe_percent": float(
                    summary["Loss of active material in positive electrode [%]"][index]
                ),
                "rows": int(series["time_s"].size),
            }
        )
    if not records:
        raise RuntimeError("no complete check-up")
    fresh = records[0]
    for r in records:
        r["soh_true"] = r["capacity_ah"] / fresh["capacity_ah"]
        r["resistance_growth_true"] = r["resistance_1s_ohm"] / fresh["resistance_1s_ohm"]
    info = {
        "condition": cond,
        "checkups": records,
        "termination": sol.termination,
        "simulated_cycles_total": int(len(sol.cycles) - len(records)),
        "fresh_capacity_ah": fresh["capacity_ah"],
    }
    tmp = out / "trajectories" / f".{name}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out / "trajectories" / f"{name}.npz")
    return info


def job_ocv(out: Path) -> dict:
    """C/20 discharge from full, rest, C/20 charge and CV to C/50, rest (as `bms identify`
    expects), at 25 degC and natural ageing rates."""
    pybamm = _pybamm()
    pv = parameter_values(25.0, 1.0)
    s = pybamm.step.string
    steps = [
        s(f"Discharge at C/20 until {V_MIN} V", period=60),
        s("Rest for 1 hour", period=60),
        s(f"Charge at C/20 until {V_MAX} V", period=60),
        s(f"Hold at {V_MAX} V until C/50", period=60),
        s("Rest for 1 hour", period=60),
    ]
    sim = pybamm.Simulation(make_model(), parameter_values=pv, experiment=pybamm.Experiment(steps))
    sol = sim.solve(initial_soc=1.0)
    _write_csv(out / "characterisation" / "ocv_25C.csv", _series(sol))
    return {"test": "OCV", "temp_c": 25.0, "steps": [str(x) for x in steps]}


def job_hppc(out: Path, temp_c: float) -> dict:
    """At SOC 1.0, 0.9, ..., 0.1, 0.05 (by charge at the nominal capacity): 1C discharge pulse
    30 s, rest 600 s, 0.75C charge pulse 30 s, rest 600 s, C/2 discharge to the next level,
    rest 1 h."""
    pybamm = _pybamm()
    pv = parameter_values(temp_c, 1.0)
    s = pybamm.step.string
    # 1 s samples throughout: `bms identify` integrates the current by the trapezoid rule, and
    # a coarser log loses half a period of current at every step change
    steps = [s("Rest for 2 minutes", period=1)]
    levels = [round(1.0 - 0.1 * k, 2) for k in range(10)] + [0.05]
    for k, level in enumerate(levels):
        steps += [
            s(f"Discharge at 1C for 30 seconds or until {V_MIN} V", period=1),
            s("Rest for 600 seconds", period=1),
            s("Charge at 0.75C for 30 seconds or until 4.25 V", period=1),
            s("Rest for 600 seconds", period=1),
        ]
        if k + 1 < len(levels):
            minutes = (level - levels[k + 1]) * 120.0
            steps += [
                s(f"Discharge at C/2 for {minutes:.1f} minutes or until {V_MIN} V", period=1),
                s("Rest for 1 hour", period=1),
            ]
    sim = pybamm.Simulation(make_model(), parameter_values=pv, experiment=pybamm.Experiment(steps))
    sol = sim.solve(initial_soc=1.0)
    _write_csv(out / "characterisation" / f"hppc_{int(temp_c)}C.csv", _series(sol))
    return {"test": "HPPC", "temp_c": temp_c, "levels": levels}


FMT = {"time_s": "%.1f", "current_a": "%.4f", "voltage_v": "%.5f", "temp_c": "%.2f"}


def _write_csv(path: Path, cols: dict[str, np.ndarray]) -> None:
    t = np.round(cols["time_s"], 1)
    keep = np.ones(t.size, dtype=bool)
    keep[:-1] = t[1:] != t[:-1]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(",".join(FMT) + "\n")
        for k in np.flatnonzero(keep):
            handle.write(",".join(FMT[n] % cols[n][k] for n in FMT).replace("-0.0000,", "0.0000,"))
            handle.write("\n")
    os.replace(tmp, path)


def all_jobs(mini: bool) -> dict[str, tuple]:
    jobs: dict[str, tuple] = {"ocv_25C": ("ocv", ())}
    for temp_c in HPPC_TEMPS:
        jobs[f"hppc_{int(temp_c)}C"] = ("hppc", (temp_c,))
    for name, cond in conditions(mini).items():
        jobs[name] = ("trajectory", (name, cond, 3 if mini else MAX_BLOCKS))
    return jobs


def output_of(out: Path, name: str) -> Path:
    if name.startswith("t"):
        return out / "trajectories" / f"{name}.npz"
    return out / "characterisation" / f"{name}.csv"


def run_job(args) -> tuple[str, dict]:
    name, kind, jargs, out = args
    out = Path(out)
    t0 = time.time()
    try:
        if kind == "trajectory":
            info = job_trajectory(out, *jargs)
        elif kind == "ocv":
            info = job_ocv(out)
        else:
            info = job_hppc(out, *jargs)
    except Exception as exc:
        print(f"[fail] {name}: {exc}\n{traceback.format_exc()}", flush=True)
        return name, {"error": f"{type(exc).__name__}: {exc}", "runtime_s": time.time() - t0}
    info["runtime_s"] = round(time.time() - t0, 1)
    (out / "jobs").mkdir(exist_ok=True)
    part = out / "jobs" / f"{name}.json"
    part.write_text(json.dumps(info, indent=1, default=float) + "\n")
    print(f"[done] {name} in {info['runtime_s']} s", flush=True)
    return name, info


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    pybamm = _pybamm()
    from importlib.metadata import version

    import casadi
    import scipy

    return {
        "python": platform.python_version(),
        "pybamm": pybamm.__version__,
        "pybammsolvers": version("pybammsolvers"),
        "numpy": np.__version__,
        "casadi": casadi.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/soh"))
    ap.add_argument("--only", nargs="*", default=None, help="job names (see --list)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2)")
    ap.add_argument("--mini", action="store_true", help="2 short trajectories, for CI")
    ap.add_argument("--force", action="store_true", help="re-run jobs whose output exists")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    jobs = all_jobs(a.mini)
    if a.list:
        for name, (kind, jargs) in jobs.items():
            print(name, kind, json.dumps(jargs[1]) if kind == "trajectory" else "")
        return 0
    out = a.out
    for sub in ("trajectories", "characterisation", "jobs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = list(jobs) if not a.only else a.only
    unknown = [n for n in names if n not in jobs]
    if unknown:
        ap.error(f"unknown job(s) {unknown}; see --list")
    todo = [n for n in names if a.force or not (out / "jobs" / f"{n}.json").exists()]
    # the trajectories first (longest), characterisation after
    todo.sort(key=lambda n: (not n.startswith("t"), n))
    print(f"{len(todo)} job(s) to run, {len(names) - len(todo)} already done", flush=True)
    t0 = time.time()
    work = [(n, jobs[n][0], jobs[n][1], str(out)) for n in todo]
    if a.jobs > 1 and len(work) > 1:
        with mp.get_context("spawn").Pool(a.jobs, maxtasksperchild=1) as pool:
            results = list(pool.imap_unordered(run_job, work))
    else:
        results = [run_job(w) for w in work]
    wall_s = time.time() - t0
    manifest = {
        "generator": "models/soh/generate.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": SEED,
        "versions": versions(),
        "parameter_set": PARAMETER_SET,
        "model": f"{MODEL} {DEGRADATION_OPTIONS}, isothermal",
        "acceleration": {
            "factor": ACCELERATION,
            "parameters": ACCELERATED,
            "cell_spread_lognormal_sigma": CELL_SPREAD_SIGMA,
        },
        "cycles_per_block": CYCLES_PER_BLOCK,
        "max_blocks": 3 if a.mini else MAX_BLOCKS,
        "end_capacity_fraction": END_CAPACITY_FRACTION,
        "mini": a.mini,
        "jobs": {},
        "files": {},
        "last_run": {"jobs": todo, "wall_s": round(wall_s, 1)},
    }
    for name in jobs:
        part = out / "jobs" / f"{name}.json"
        if part.exists():
            manifest["jobs"][name] = json.loads(part.read_text())
            path = output_of(out, name)
            manifest["files"][str(path.relative_to(out))] = {
                "sha256": sha256(path),
                "bytes": path.stat().st_size,
            }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float) + "\n")
    failed = [n for n, info in results if "error" in info]
    print(
        f"wrote {out / 'manifest.json'}; {len(results) - len(failed)} ok, failed {failed}; "
        f"{wall_s:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
