"""Reaction time of protection to every fault the simulated pack can inject.

For each fault kind, one `bms sim` process (a steady 10 A discharge, the config's debounce and
delays) gets the fault injected at ``--inject-at-s`` and the log tells, on one wall clock with
millisecond resolution: when the plant injected it, when the diagnosis latched it, when the
contactors were commanded open ("closed -> opening") and when the feedback confirmed them open
("opening -> fault"). The budget each is judged against is what the config allows:
front-end timeout (for silence) or detection time (stuck, heating) + debounce x period +
open_delay_s (not for faults that open at once) + two cycles.

    .venv/bin/python benchmarks/bench_reaction.py [--config config/sim.toml]

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import tomli_w

from bms.config import load_config
from bms.protection.diagnosis import FAULTS, Action

REPO = Path(__file__).resolve().parents[1]
BMS = Path(sys.executable).with_name("bms")

# kind, injection argument, fault expected to latch, time the plant needs before the
# condition exists at all (seconds; from the config where it is a setting)
CASES = [
    ("open_wire", "open_wire@{t}:cell=3", "cell_voltage_invalid", lambda c: 0.0),
    ("nan", "nan@{t}:cell=16", "cell_voltage_invalid", lambda c: 0.0),
    ("stuck", "stuck@{t}:cell=7", "cell_voltage_stuck", lambda c: c.protection.stuck_time_s),
    # one cell heating at 200 W into 70 J/K: the spread to its neighbours trips first
    (
        "overtemp",
        "overtemp@{t}:cell=5",
        "temp_spread_msl",
        lambda c: (c.limits.temp_spread_c.msl + 1.0) * 70.0 / 200.0,
    ),
    ("short", "short@{t}", "short_circuit", lambda c: 0.0),
    (
        "silence",
        "silence@{t}",
        "frontend_timeout",
        lambda c: c.frontend.options.cell_voltage_timeout_s,
    ),
    ("insulation", "insulation@{t}", "insulation_error", lambda c: 0.0),
    ("interlock", "interlock@{t}", "interlock_open", lambda c: 0.0),
    # the open wire opens the contactors; the weld shows when they do not open
    (
        "weld + open_wire",
        "weld@1 --inject open_wire@{t}:cell=1",
        "contactor_weld",
        lambda c: (
            c.diagnosis.debounce_cycles * c.loop.period_s
            + c.diagnosis.open_delay_s
            + c.control.relay_settle_s
        ),
    ),
]
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _time(line: str) -> float:
    stamp = LOG_TIME.match(line)[1]
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _first(lines: list[str], text: str) -> float | None:
    return next((_time(line) for line in lines if text in line and LOG_TIME.match(line)), None)


def measure(config_path: Path, inject: str, fault_id: str, inject_at_s: float) -> dict:
    args = [str(BMS), "sim", "--config", str(config_path), "--duration-s", str(inject_at_s + 8)]
    for part in inject.format(t=inject_at_s).split(" --inject "):
        args += ["--inject", part]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    injected = max(
        t
        for t in (
            _first(lines, f"injecting fault {k}")
            for k in (
                "open_wire",
                "nan",
                "stuck",
                "overtemp",
                "short",
                "silence",
                "insulation",
                "interlock",
            )
        )
        if t is not None
    )
    times = {
        "latched": _first(lines, f"fault latched: {fault_id}"),
        "commanded": _first(lines, "contactors: closed -> opening"),
        "confirmed": _first(lines, "contactors: opening -> fault"),
    }
    return {k: None if t is None else t - injected for k, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "sim.toml"))
    parser.add_argument("--inject-at-s", type=float, default=3.0)
    args = parser.parse_args()
    base = Path(args.config).resolve()
    data = tomllib.loads(base.read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Same config, but absolute paths, its own latch file, store and control socket (each
        # run must start with nothing latched) and a steady discharge.
        data["pack"]["cell_params"] = str((base.parent / data["pack"]["cell_params"]).resolve())
        data["can"]["dbc_file"] = str((base.parent / data["can"]["dbc_file"]).resolve())
        data["protection"]["limits"] = str((base.parent / data["protection"]["limits"]).resolve())
        data["protection"]["latch_file"] = str(Path(tmp) / "latched.json")
        data["store"] = {"path": str(Path(tmp) / "state.sqlite")}
        data["service"] = {"control_socket": str(Path(tmp) / "control.sock")}
        data["sim"]["load"] = {"profile": "constant", "current_a": -10.0}
        config_path = Path(tmp) / "reaction.toml"
        config_path.write_text(tomli_w.dumps(data))
        config = load_config(config_path)
        period_s = config.loop.period_s
        for kind, inject, fault_id, needs_s in CASES:
            for name in ("latched.json", "state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
                (Path(tmp) / name).unlink(missing_ok=True)
            row = config.diagnosis.row(fault_id)
            delay_s = 0.0 if FAULTS[fault_id].action is Action.OPEN_NOW else row.open_delay_s
            budget_s = needs_s(config) + row.debounce_cycles * period_s + delay_s + 2 * period_s
            got = measure(config_path, inject, fault_id, args.inject_at_s)
            rows.append((kind, fault_id, budget_s, got))
    print(
        f"loop period {period_s:g} s, front-end period {config.sim.options.tx_period_s:g} s; "
        "times in seconds from the plant injecting the fault\n"
    )
    print(
        "| fault injected | fault latched | budget | latched | commanded open | "
        "confirmed open | latched and commanded within budget |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, fault_id, budget_s, got in rows:
        cells = [
            "—" if got[k] is None else f"{got[k]:.2f}"
            for k in ("latched", "commanded", "confirmed")
        ]
        ok = (
            None not in (got["latched"], got["commanded"])
            and max(got["latched"], got["commanded"]) <= budget_s
        )
        print(
            f"| {kind} | {fault_id} | {budget_s:.2f} | "
            + " | ".join(cells)
            + f" | {'yes' if ok else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
