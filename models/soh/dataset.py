#!/usr/bin/env python3
"""Turn the generator's check-ups into the table the model is trained and measured on.

Runs in the run-time environment (it uses the service's EKF and bms.health, the same code the
board runs):

    .venv/bin/python models/soh/dataset.py --data benchmarks/out/soh \
        --params models/soh/okane2022_spm --out benchmarks/out/soh/dataset.csv
    .venv/bin/python models/soh/dataset.py ... --samples tests/data/soh   # the test sample

Every check-up becomes a log as a BMS would record it: sensor noise is added (seeded per
trajectory, check-up and realisation: voltage sigma ``VOLTAGE_NOISE_V``, current sigma
``CURRENT_NOISE_A``, voltage rounded to 1 mV), then the charge-segment features
(bms/health/features.py) and the online estimate (bms/health/online.py, after the EKF) are
computed from it. Truth: capacity (ElectrodeSOH of the aged cell) as a fraction of the
parameter set's capacity, and resistance growth (instantaneous response to the check-up's 1C
pulse over the first check-up's, from the noise-free samples).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from bms.csvio import write_columns
from bms.estimation.cell_params import load_cell_params
from bms.health.features import (
    FEATURE_NAMES,
    NoChargeSegment,
    charge_features,
    find_charge_segments,
)
from bms.health.online import run_log

SEED = 20261203
VOLTAGE_NOISE_V = 0.002
CURRENT_NOISE_A = 0.01
REALISATIONS = {"train": 3, "test": 1}
"""Noise realisations per check-up: the training set is augmented, the test set is not."""
PULSE_C_RATE = 1.0
COLUMNS = (
    "trajectory",
    "split",
    "checkup",
    "realisation",
    "temp_c_ambient",
    "charge_c_rate_cycling",
    "depth_of_discharge",
    "storage_soc",
    "simulated_cycles",
    "throughput_ah",
    *FEATURE_NAMES,
    "soh_true",
    "resistance_growth_true",
    "capacity_online_ah",
    "capacity_online_std_ah",
    "resistance_growth_online_std",
    "online_anchors",
    "online_steps",
)


def checkup_log(arrays, k: int) -> dict[str, np.ndarray]:
    return {
        name: arrays[f"c{k:02d}_{name}"] for name in ("time_s", "current_a", "voltage_v", "temp_c")
    }


def noisy(log: dict[str, np.ndarray], seed_key: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((SEED, *seed_key))
    out = dict(log)
    n = log["time_s"].size
    out["voltage_v"] = np.round(log["voltage_v"] + rng.normal(0.0, VOLTAGE_NOISE_V, n), 3)
    out["current_a"] = np.round(log["current_a"] + rng.normal(0.0, CURRENT_NOISE_A, n), 3)
    return out


def instantaneous_pulse_resistance(log: dict[str, np.ndarray], capacity_ah: float) -> float:
    """dv/di at the 1C discharge pulse out of rest (the last such step of the check-up)."""
    di = np.diff(log["current_a"])
    steps = np.flatnonzero(di <= -0.9 * PULSE_C_RATE * capacity_ah)
    rested = [k for k in steps if abs(log["current_a"][k]) < 1e-6]
    k = rested[-1]
    return float((log["voltage_v"][k + 1] - log["voltage_v"][k]) / di[k])


def trajectory_rows(job: tuple) -> list[dict]:
    name, info, data_dir, params_dir, sample_dir = job
    cell = load_cell_params(Path(params_dir))
    arrays = np.load(Path(data_dir) / "trajectories" / f"{name}.npz")
    cond = info["condition"]
    checkups = info["checkups"]
    fresh_r = instantaneous_pulse_resistance(checkup_log(arrays, 0), cell.capacity_ah)
    rows = []
    for record in checkups:
        k = record["checkup"]
        clean = checkup_log(arrays, k)
        true_r = instantaneous_pulse_resistance(clean, cell.capacity_ah)
        for realisation in range(REALISATIONS[cond["split"]]):
            log = noisy(clean, (int(name[1:]), k, realisation))
            row = {
                "trajectory": name,
                "split": cond["split"],
                "checkup": k,
                "realisation": realisation,
                "temp_c_ambient": cond["temp_c"],
                "charge_c_rate_cycling": cond["charge_c_rate"],
                "depth_of_discharge": cond["depth_of_discharge"],
                "storage_soc": cond["storage_soc"],
                "simulated_cycles": record["simulated_cycles"],
                "throughput_ah": record["throughput_ah"],
                "soh_true": record["capacity_ah"] / cell.capacity_ah,
                "resistance_growth_true": true_r / fresh_r,
            }
            try:
                segment = find_charge_segments(
                    log["time_s"],
                    log["current_a"],
                    log["voltage_v"],
                    cell.capacity_ah,
                    cell.voltage_max_v,
                )[-1]
            except NoChargeSegment as exc:
                print(f"{name} check-up {k}: {exc}", flush=True)
                continue
            features = charge_features(
                log["time_s"],
                log["current_a"],
                log["voltage_v"],
                log["temp_c"],
                segment,
                cell.capacity_ah,
            )
            online, _ = run_log(cell, log)
            vector = features.vector(online.resistance_growth)
            row |= dict(zip(FEATURE_NAMES, vector.tolist(), strict=True))
            row |= {
                "capacity_online_ah": online.capacity_ah,
                "capacity_online_std_ah": online.capacity_std_ah,
                "resistance_growth_online_std": online.resistance_growth_std,
                "online_anchors": online.anchors,
                "online_steps": online.steps,
            }
            rows.append(row)
            if sample_dir and realisation == 0:
                path = Path(sample_dir) / f"{name}_checkup{k:02d}.csv"
                write_columns(path, log, {"time_s": 1, "current_a": 3, "voltage_v": 3, "temp_c": 2})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("benchmarks/out/soh"))
    ap.add_argument("--params", type=Path, default=Path("models/soh/okane2022_spm"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/soh/dataset.csv"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="instead: write the first and the last check-up above 70 %% SOH of "
        "--sample-trajectory as CSV here, with their truth and features",
    )
    ap.add_argument("--sample-trajectory", default="t21")
    a = ap.parse_args(argv)
    manifest = json.loads((a.data / "manifest.json").read_text())
    jobs = {n: j for n, j in manifest["jobs"].items() if n.startswith("t") and "error" not in j}
    t0 = time.time()
    if a.samples is not None:
        a.samples.mkdir(parents=True, exist_ok=True)
        info = dict(jobs[a.sample_trajectory])
        nominal_ah = load_cell_params(a.params).capacity_ah
        in_range = [c for c in info["checkups"] if c["capacity_ah"] >= 0.7 * nominal_ah]
        info["checkups"] = [in_range[0], in_range[-1]]  # the targets hold to 70 %
        rows = trajectory_rows((a.sample_trajectory, info, a.data, a.params, a.samples))
        truth = {
            f"{a.sample_trajectory}_checkup{r['checkup']:02d}.csv": {
                k: r[k] for k in ("soh_true", "resistance_growth_true", "capacity_online_ah")
            }
            | {
                "capacity_true_ah": r["soh_true"] * load_cell_params(a.params).capacity_ah,
                "features": [r[name] for name in FEATURE_NAMES],
            }
            for r in rows
        }
        (a.samples / "truth.json").write_text(
            json.dumps(
                {
                    "source": f"models/soh/dataset.py --samples, trajectory "
                    f"{a.sample_trajectory} ({jobs[a.sample_trajectory]['condition']})",
                    "source_manifest_files": {
                        k: v for k, v in manifest["files"].items() if a.sample_trajectory in k
                    },
                    "noise": {"voltage_v": VOLTAGE_NOISE_V, "current_a": CURRENT_NOISE_A},
                    "files": truth,
                },
                indent=1,
            )
            + "\n"
        )
        print(json.dumps(truth, indent=1))
        return 0
    work = [(n, j, a.data, a.params, None) for n, j in sorted(jobs.items())]
    if a.jobs > 1:
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            parts = pool.map(trajectory_rows, work)
    else:
        parts = [trajectory_rows(w) for w in work]
    rows = [r for part in parts for r in part]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(",".join(COLUMNS) + "\n")
        for r in rows:
            handle.write(",".join(_cell(r[c]) for c in COLUMNS) + "\n")
    os.replace(tmp, a.out)
    print(
        f"wrote {a.out}: {len(rows)} rows from {len(work)} trajectories in {time.time() - t0:.0f} s"
    )
    return 0


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
