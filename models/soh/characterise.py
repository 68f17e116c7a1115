#!/usr/bin/env python3
"""Fit the fresh cell's parameter set (models/soh/okane2022_spm/) from the generator's OCV and
HPPC tests, with `bms identify`'s own fitting and writing code.

    .venv/bin/python models/soh/characterise.py --data benchmarks/out/soh/characterisation \
        --out models/soh/okane2022_spm

It differs from `bms identify` in one thing: a pulse that the 2RC fit cannot explain with
positive resistances (the SPM at 40 degC relaxes with almost no fast time constant) is left
out, and named on stdout and in ``dropped_pulses.json``, instead of failing the whole test;
the impedance grid interpolates over it from the neighbouring pulses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bms.estimation.cell_params import load_cell_params
from bms.estimation.fitting import (
    FitError,
    HppcFit,
    PulseFit,
    charge_ah,
    check_samples,
    find_pulse_windows,
    fit_ocv,
    fit_pulse_window,
)
from bms.identify import _write_set, describe, read_test

HPPC_FILES = ("hppc_10C.csv", "hppc_25C.csv", "hppc_40C.csv")


def fit_hppc_lenient(path: Path, ocv) -> tuple[HppcFit, list[dict]]:
    """Every pulse of one test that fits; the ones that do not, with why."""
    data = read_test(path)
    check_samples(data)
    soc = float(np.interp(data.voltage_v[0], ocv.ocv_v, ocv.soc)) + charge_ah(data) / (
        ocv.capacity_ah
    )
    pulses, dropped = [], []
    for start, pulse_start, stop in find_pulse_windows(data, ocv.capacity_ah):
        window = slice(start, stop)
        ocv_v = np.interp(soc[window], ocv.soc, ocv.ocv_v)
        try:
            r0, r1, tau1, r2, tau2, rms = fit_pulse_window(
                data.time_s[window], data.current_a[window], data.voltage_v[window] - ocv_v
            )
        except FitError as exc:
            dropped.append(
                {"file": path.name, "soc": round(float(soc[pulse_start]), 3), "reason": str(exc)}
            )
            continue
        pulses.append(PulseFit(float(soc[pulse_start]), r0, r1, tau1 / r1, r2, tau2 / r2, rms))
    return HppcFit(temp_c=float(np.round(np.mean(data.temp_c), 1)), pulses=pulses), dropped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("benchmarks/out/soh/characterisation"))
    ap.add_argument("--out", type=Path, default=Path("models/soh/okane2022_spm"))
    a = ap.parse_args(argv)
    ocv_path = a.data / "ocv_25C.csv"
    ocv = fit_ocv(read_test(ocv_path))
    fits, dropped = [], []
    hppc_paths = [a.data / name for name in HPPC_FILES]
    for path in hppc_paths:
        fit, lost = fit_hppc_lenient(path, ocv)
        fits.append(fit)
        dropped += lost
    a.out.mkdir(parents=True, exist_ok=True)
    _write_set(a.out, a.out.name, ocv, fits, ocv_path, hppc_paths)
    (a.out / "dropped_pulses.json").write_text(json.dumps(dropped, indent=1) + "\n")
    cell = load_cell_params(a.out)
    print(
        f"wrote {a.out}: {describe(cell)}; dropped {len(dropped)} pulse(s): "
        + ", ".join(f"{d['file']} soc {d['soc']}" for d in dropped)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
