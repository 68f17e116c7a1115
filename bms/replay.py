"""``bms replay``: the service's estimator run over a logged single-cell CSV.

The same kernels and the same wrapper as the control loop (one cell, one sensor), stepped
with each row's measured dt. Without an initial SOC the estimator starts from the OCV of the
first sample, as the service does at boot. A ``soc_true`` column (from a physics model or a
reference test) turns the run into an accuracy measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms.config import SocConfig
from bms.csvio import read_columns, write_columns
from bms.estimation.cell_params import CellParams
from bms.estimation.estimator import PackEstimator

INPUT_COLUMNS = ("time_s", "current_a", "voltage_v", "temp_c")
SETTLE_S = 300.0
"""Errors are scored after this long: the estimator may take a while to find an unknown
start, and the first minutes say more about the start than about the estimator."""
OUTPUT_DIGITS = {
    "time_s": 3,
    "soc": 6,
    "soc_std": 6,
    "voltage_pred_v": 5,
    "charge_limit_10s_a": 3,
    "discharge_limit_10s_a": 3,
}


@dataclass(frozen=True)
class Replay:
    time_s: np.ndarray
    current_a: np.ndarray
    voltage_v: np.ndarray
    soc: np.ndarray
    soc_std: np.ndarray
    voltage_pred_v: np.ndarray
    charge_limit_10s_a: np.ndarray
    discharge_limit_10s_a: np.ndarray
    soc_true: np.ndarray | None

    def errors(self, settle_s: float = SETTLE_S) -> dict[str, float] | None:
        """SOC RMSE and maximum absolute error after ``settle_s``; None without truth."""
        if self.soc_true is None:
            return None
        scored = self.time_s - self.time_s[0] >= settle_s
        error = (self.soc - self.soc_true)[scored]
        if not error.size:
            return None
        return {
            "rmse": float(np.sqrt(np.mean(error**2))),
            "max_abs": float(np.max(np.abs(error))),
            "samples": int(error.size),
        }


def read_log(path: Path) -> dict[str, np.ndarray]:
    """The log's columns; ``soc_true`` too where present."""
    columns = read_columns(path, INPUT_COLUMNS, optional=("soc_true",))
    dt_s = np.diff(columns["time_s"])
    if np.any(dt_s <= 0.0):
        row = int(np.flatnonzero(dt_s <= 0.0)[0]) + 3  # header and 1-based lines
        raise ValueError(f"{path}:{row}: time_s does not rise")
    return columns


GUESS_SOC_STD = 0.3
"""Uncertainty of a start SOC given by hand: a guess, which the voltage soon corrects."""


def replay(
    cell: CellParams,
    log: dict[str, np.ndarray],
    initial_soc: float | None = None,
    initial_soc_std: float = GUESS_SOC_STD,
    soc_config: SocConfig | None = None,
) -> Replay:
    """Step the estimator over every row of ``log`` (see :func:`read_log`), from the OCV of
    the first sample or from ``initial_soc`` with ``initial_soc_std``."""
    soc_config = soc_config or SocConfig()
    estimator = PackEstimator(cell, 1, 1, soc_config.rest_current_a, soc_config.rest_time_s)
    if initial_soc is not None:
        estimator.set_soc(initial_soc, initial_soc_std)
    n = log["time_s"].size
    out = {name: np.empty(n) for name in OUTPUT_DIGITS if name != "time_s"}
    previous_t_s = log["time_s"][0]
    for k in range(n):
        t_s = log["time_s"][k]
        voltage_v = log["voltage_v"][k : k + 1]
        estimate = estimator.step(
            float(log["current_a"][k]), voltage_v, log["temp_c"][k : k + 1], t_s - previous_t_s
        )
        previous_t_s = t_s
        charge_a, discharge_a = estimate.pack_limits_a(10.0)
        out["soc"][k] = estimate.soc[0]
        out["soc_std"][k] = estimate.soc_std[0]
        # The prediction before this sample's update; at the very first sample there is none.
        out["voltage_pred_v"][k] = voltage_v[0] - np.nan_to_num(estimate.innovation_v[0])
        out["charge_limit_10s_a"][k] = charge_a
        out["discharge_limit_10s_a"][k] = discharge_a
    return Replay(
        time_s=log["time_s"],
        current_a=log["current_a"],
        voltage_v=log["voltage_v"],
        soc_true=log.get("soc_true"),
        **out,
    )


def write_estimates(path: Path, result: Replay) -> None:
    write_columns(path, {name: getattr(result, name) for name in OUTPUT_DIGITS}, OUTPUT_DIGITS)


def plot(path: Path, result: Replay, title: str) -> None:
    """A PNG: voltage measured and predicted, SOC with its 2-sigma band (and the truth),
    the SOC error where the truth is known, and the current."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    t_h = (result.time_s - result.time_s[0]) / 3600.0
    panels = 4 if result.soc_true is not None else 3
    figure, axes = pyplot.subplots(panels, 1, figsize=(11, 2.6 * panels), sharex=True)
    ax = iter(axes)

    voltage = next(ax)
    voltage.plot(t_h, result.voltage_v, lw=0.8, label="measured")
    voltage.plot(t_h, result.voltage_pred_v, lw=0.8, ls="--", label="predicted (ECM)")
    voltage.set_ylabel("cell voltage (V)")
    voltage.legend(loc="best", fontsize=8)

    soc = next(ax)
    band = 2.0 * result.soc_std
    soc.fill_between(
        t_h,
        (result.soc - band) * 100,
        (result.soc + band) * 100,
        alpha=0.25,
        lw=0,
        label="estimate ±2σ",
    )
    soc.plot(t_h, result.soc * 100, lw=1.0, label="estimate (EKF)")
    if result.soc_true is not None:
        soc.plot(t_h, result.soc_true * 100, lw=1.0, ls="--", color="k", label="truth")
    soc.set_ylabel("SOC (%)")
    soc.legend(loc="best", fontsize=8)

    if result.soc_true is not None:
        error = next(ax)
        error.plot(t_h, (result.soc - result.soc_true) * 100, lw=0.8, color="C3")
        error.fill_between(t_h, -band * 100, band * 100, alpha=0.2, lw=0, color="C3")
        error.axhline(0.0, color="k", lw=0.5)
        error.axvline(SETTLE_S / 3600.0, color="grey", lw=0.5, ls=":")
        scores = result.errors()
        if scores is not None:
            error.set_title(
                f"after {SETTLE_S:.0f} s: RMSE {scores['rmse'] * 100:.2f} %, "
                f"max {scores['max_abs'] * 100:.2f} %",
                fontsize=9,
            )
        error.set_ylabel("SOC error (%)")

    current = next(ax)
    current.plot(t_h, result.current_a, lw=0.6, color="C2")
    current.set_ylabel("current (A, + charge)")
    current.set_xlabel("time (h)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
